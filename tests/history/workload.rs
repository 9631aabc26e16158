//! The randomized workload: hundreds of clients against the real broker,
//! faults injected while it runs, and the history checked afterwards.
//!
//! - In-process tonic clients (one connection each) acquire, hold for a few
//!   milliseconds, and release, half-close or drop the call; some give up
//!   waiting (`max_wait_ms`), some cancel at a random moment.
//! - A few of them connect through their own [`Proxy`]: one is delayed for
//!   the whole run, the others get blackholed at random moments.
//! - Worker processes and `gpulease run` processes are SIGKILLed and
//!   SIGSTOPped (then SIGCONTed or killed) while holding or waiting.
//! - The broker itself is killed with SIGKILL and restarted on the same
//!   state directory; clients move to the new address.
//! - With a counter, every holder increments the fenced counter under its
//!   lease (the lost-update workload).
//!
//! Then: every client must be gone, the broker idle (no permit or queue slot
//! leaked) and alive, and the checker must find no violation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpulease_client::pb::v1 as pb;
use gpulease_client::pb::v1::lease_broker_client::LeaseBrokerClient;
use gpulease_client::pb::v1::lease_event::Kind as EventKind;
use gpulease_client::pb::v1::lease_request::Kind as RequestKind;
use nix::sys::signal::Signal;
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::broker::{self, BIN, BrokerLog, BrokerProcess, Settings, signal};
use crate::checker::{self, Instance};
use crate::counter::Counter;
use crate::history::{self, ClientKind, Ev, FaultKind, Recorder};
use crate::proxy::{Mode, Proxy};
use crate::rng::Rng;
use crate::worker;
use gpulease_testkit::clock::{nanos, now_ns};

/// How long a blackholed client waits before it gives its call up: well
/// past the detection bound, so that the broker notices the silence first.
const BLACKHOLE_ABANDON: Duration = Duration::from_millis(2500);

/// The shape of one run.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    /// `capacity` of the broker's one GPU.
    pub(crate) capacity: u32,
    /// How long clients keep starting calls.
    pub(crate) duration: Duration,
    /// In-process clients connected directly.
    pub(crate) in_process: usize,
    /// In-process clients behind their own proxy (the first is delayed).
    pub(crate) proxied: usize,
    /// Worker processes alive at a time.
    pub(crate) workers: usize,
    /// `gpulease run` processes alive at a time.
    pub(crate) cli: usize,
    /// How often the broker is killed with SIGKILL and restarted.
    pub(crate) restarts: usize,
    /// Whether holders increment the fenced counter.
    pub(crate) counter: bool,
    /// Whether worker and `gpulease run` processes get SIGKILL and SIGSTOP.
    pub(crate) process_faults: bool,
    /// The broker's keepalive interval.
    pub(crate) interval: Duration,
    /// The broker's keepalive timeout.
    pub(crate) timeout: Duration,
    /// Allowance on the detection bound for a loaded machine.
    pub(crate) slack: Duration,
}

/// The broker generation that clients should use now.
#[derive(Clone, Debug)]
struct Target {
    instance: u32,
    addr: String,
}

/// A child process of the workload.
#[derive(Debug)]
struct ChildInfo {
    op: String,
    kind: ClientKind,
    stopped: bool,
}

struct Shared {
    recorder: Recorder,
    target: watch::Receiver<Option<Target>>,
    stop: CancellationToken,
    next_op: AtomicU64,
    counter: Option<Counter>,
    counter_path: Option<PathBuf>,
    histories: PathBuf,
    children: Mutex<HashMap<i32, ChildInfo>>,
}

impl Shared {
    fn op_name(&self, prefix: &str) -> String {
        format!("{prefix}{}", self.next_op.fetch_add(1, Ordering::Relaxed))
    }
}

/// Runs the workload and checks it; the report's figures, or what failed.
pub(crate) async fn run(
    config: &Config,
    seed: u64,
    artifacts: &Path,
) -> Result<Vec<String>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let settings = Settings {
        env: vec![
            ("GPULEASE__CAPACITY".into(), config.capacity.to_string()),
            (
                "GPULEASE__KEEPALIVE__INTERVAL".into(),
                format!("{}ms", config.interval.as_millis()),
            ),
            (
                "GPULEASE__KEEPALIVE__TIMEOUT".into(),
                format!("{}ms", config.timeout.as_millis()),
            ),
        ],
        state_dir: dir.path().join("state"),
        dir: dir.path().to_path_buf(),
    };
    let log = BrokerLog::default();
    let first = BrokerProcess::start(&settings, 1, &log).await?;
    let (target_tx, target_rx) = watch::channel(Some(Target {
        instance: 1,
        addr: first.addr.clone(),
    }));
    let (addr_tx, addr_rx) = watch::channel(Some(first.addr.clone()));
    let histories = dir.path().join("histories");
    std::fs::create_dir_all(&histories).map_err(|e| e.to_string())?;
    let counter_path = config.counter.then(|| dir.path().join("counter"));
    let counter = match &counter_path {
        Some(path) => Some(Counter::create(path).map_err(|e| e.to_string())?),
        None => None,
    };
    let shared = Arc::new(Shared {
        recorder: Recorder::memory(),
        target: target_rx,
        stop: CancellationToken::new(),
        next_op: AtomicU64::new(1),
        counter,
        counter_path,
        histories: histories.clone(),
        children: Mutex::default(),
    });
    let mut rng = Rng::new(seed);

    let mut clients = JoinSet::new();
    for id in 0..config.in_process {
        clients.spawn(client_loop(Arc::clone(&shared), id, rng.fork(), None));
    }
    for j in 0..config.proxied {
        let mode = if j == 0 {
            Mode::Delay(Duration::from_millis(30))
        } else {
            Mode::Forward
        };
        let proxy = Proxy::start(addr_rx.clone(), mode).await;
        // The delayed client is never blackholed.
        let blackholes = j != 0;
        clients.spawn(client_loop(
            Arc::clone(&shared),
            config.in_process + j,
            rng.fork(),
            Some((proxy, blackholes)),
        ));
    }
    let processes = tokio::spawn(process_loop(
        Arc::clone(&shared),
        config.clone(),
        rng.fork(),
    ));
    let injector = config
        .process_faults
        .then(|| tokio::spawn(injector_loop(Arc::clone(&shared), rng.fork())));

    let started = Instant::now();
    let mut brokers = vec![first];
    for k in 1..=config.restarts {
        let at = config
            .duration
            .mul_f64(k as f64 / (config.restarts + 1) as f64);
        tokio::time::sleep_until(started + at).await;
        let _ = target_tx.send(None);
        let _ = addr_tx.send(None);
        brokers.last_mut().expect("a broker").kill9().await;
        let instance = u32::try_from(k + 1).unwrap_or(u32::MAX);
        let next = BrokerProcess::start(&settings, instance, &log).await?;
        let _ = addr_tx.send(Some(next.addr.clone()));
        let _ = target_tx.send(Some(Target {
            instance,
            addr: next.addr.clone(),
        }));
        brokers.push(next);
    }
    tokio::time::sleep_until(started + config.duration).await;
    shared.stop.cancel();
    let mut failures = Vec::new();
    if tokio::time::timeout(Duration::from_secs(30), clients.join_all())
        .await
        .is_err()
    {
        failures.push("in-process clients did not finish within 30 s".to_owned());
    }
    if let Some(injector) = injector {
        let _ = injector.await;
    }
    let _ = processes.await;
    let current = brokers.last_mut().expect("a broker");
    if let Err(e) = broker::wait_idle(&current.addr, Duration::from_secs(15)).await {
        failures.push(e);
    }
    if !current.alive() {
        failures.push("the broker died".to_owned());
    }
    match current.terminate().await {
        Ok(status) if status.success() => {}
        Ok(status) => failures.push(format!("the broker exited with {status} after SIGTERM")),
        Err(e) => failures.push(e),
    }

    let mut entries = shared.recorder.entries();
    entries.extend(history::load_dir(&histories));
    let ops = history::fold(entries.clone());
    let lines = log.lines();
    let instances: Vec<Instance> = brokers
        .iter()
        .map(|b| Instance {
            instance: b.instance,
            killed_at: b.killed_at,
        })
        .collect();
    let records = match &shared.counter {
        Some(counter) => Some(counter.records().map_err(|e| e.to_string())?),
        None => None,
    };
    let report = checker::check(&checker::Inputs {
        ops: &ops,
        log: &lines,
        instances: &instances,
        capacity: config.capacity as usize,
        bound: nanos(config.interval + config.timeout),
        slack: nanos(config.slack),
        counter: records.as_deref(),
    });
    save(artifacts, &lines, &entries, &report);
    let mut figures = report.figure_lines();
    figures.insert(0, format!("seed: {seed}"));
    figures.push(format!("artifacts: {}", artifacts.display()));
    failures.extend(report.violations.iter().cloned());
    if failures.is_empty() {
        Ok(figures)
    } else {
        let shown: Vec<&String> = failures.iter().take(25).collect();
        Err(format!(
            "{} failure(s), first {}:\n  {}\n{}",
            failures.len(),
            shown.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n  "),
            figures.join("\n")
        ))
    }
}

/// Keeps the broker's log, the history and the report for a look after the
/// run.
fn save(
    dir: &Path,
    lines: &[broker::LogLine],
    entries: &[history::Entry],
    report: &checker::Report,
) {
    let _ = std::fs::create_dir_all(dir);
    let log: String = lines
        .iter()
        .map(|l| format!("{} {} {}\n", l.instance, l.t, l.text))
        .collect();
    let _ = std::fs::write(dir.join("broker.log"), log);
    let history: String = entries
        .iter()
        .filter_map(|e| serde_json::to_string(e).ok())
        .map(|line| line + "\n")
        .collect();
    let _ = std::fs::write(dir.join("history.jsonl"), history);
    let text = format!(
        "{}\n\nviolations:\n{}\n",
        report.figure_lines().join("\n"),
        report.violations.join("\n")
    );
    let _ = std::fs::write(dir.join("report.txt"), text);
}

/// What one call will do.
#[derive(Clone, Copy, Debug)]
struct Plan {
    max_wait_ms: u32,
    cancel: Option<(Duration, Ending)>,
    hold: Duration,
    end: Ending,
    blackhole: Option<Blackhole>,
}

/// When a proxied client's connection is blackholed.
#[derive(Clone, Copy, Debug)]
enum Blackhole {
    /// This long after the call was opened (usually while waiting).
    After(Duration),
    /// Right after the grant, once the counter is read.
    Holding,
}

/// How a call is ended by its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    Release,
    HalfClose,
    Drop,
}

impl Plan {
    fn random(rng: &mut Rng, blackholes: bool) -> Self {
        let ending = |rng: &mut Rng, weights: &[u64]| match rng.weighted(weights) {
            0 => Ending::Release,
            1 => Ending::HalfClose,
            _ => Ending::Drop,
        };
        Self {
            max_wait_ms: if rng.chance(0.1) {
                u32::try_from(rng.range(20, 800)).unwrap_or(0)
            } else {
                0
            },
            cancel: rng.chance(0.15).then(|| {
                (
                    Duration::from_millis(rng.range(0, 1500)),
                    ending(rng, &[1, 1, 1]),
                )
            }),
            hold: Duration::from_millis(if rng.chance(0.95) {
                rng.range(0, 8)
            } else {
                rng.range(20, 80)
            }),
            end: ending(rng, &[85, 7, 8]),
            blackhole: (blackholes && rng.chance(0.25)).then(|| {
                if rng.chance(0.5) {
                    Blackhole::Holding
                } else {
                    Blackhole::After(Duration::from_millis(rng.range(0, 1500)))
                }
            }),
        }
    }
}

async fn client_loop(shared: Arc<Shared>, id: usize, mut rng: Rng, proxy: Option<(Proxy, bool)>) {
    let kind = if proxy.is_some() {
        ClientKind::Proxied
    } else {
        ClientKind::InProcess
    };
    let mut target_rx = shared.target.clone();
    let mut cached: Option<(u32, LeaseBrokerClient<Channel>)> = None;
    while !shared.stop.is_cancelled() {
        let target = tokio::select! {
            target = target_rx.wait_for(Option::is_some) => match target {
                Ok(target) => target.clone().expect("waited for Some"),
                Err(_) => return,
            },
            () = shared.stop.cancelled() => return,
        };
        let client = match &cached {
            Some((instance, client)) if *instance == target.instance => client.clone(),
            _ => {
                let addr = proxy
                    .as_ref()
                    .map_or(target.addr.as_str(), |(p, _)| p.addr());
                match broker::connect(addr).await {
                    Ok(client) => {
                        cached = Some((target.instance, client.clone()));
                        client
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                }
            }
        };
        let op = shared.op_name(&format!("c{id}-"));
        let plan = Plan::random(&mut rng, proxy.as_ref().is_some_and(|(_, b)| *b));
        let call = Call {
            shared: &shared,
            op: &op,
            instance: target.instance,
            kind,
            plan,
            proxy: proxy.as_ref().map(|(p, _)| p),
        };
        if call.run(client).await {
            cached = None;
        }
        tokio::time::sleep(Duration::from_millis(rng.range(0, 30))).await;
    }
}

/// One `AcquireLease` call of an in-process client.
struct Call<'a> {
    shared: &'a Shared,
    op: &'a str,
    instance: u32,
    kind: ClientKind,
    plan: Plan,
    proxy: Option<&'a Proxy>,
}

/// How a call's waiting phase ended.
enum Waited {
    Granted(u64),
    /// Granted, but the client had already asked to stop waiting.
    GrantedAfterCancel,
    /// Over; whether to reconnect.
    Over(bool),
}

impl Call<'_> {
    fn record(&self, ev: Ev) -> u64 {
        self.shared.recorder.record(self.op, ev)
    }

    fn ended(&self, result: Result<Option<pb::LeaseEvent>, tonic::Status>) -> bool {
        match result {
            Ok(_) => {
                self.record(Ev::Ended { code: "ok".into() });
                false
            }
            Err(status) => {
                self.record(Ev::Ended {
                    code: worker::code_name(&status),
                });
                true
            }
        }
    }

    /// Runs the call; returns whether the client should reconnect.
    async fn run(&self, mut client: LeaseBrokerClient<Channel>) -> bool {
        self.record(Ev::Invoke {
            instance: self.instance,
            pid: 0,
            max_wait_ms: self.plan.max_wait_ms,
            client: self.kind,
        });
        let started = Instant::now();
        let (tx, rx) = mpsc::channel(4);
        let acquire = pb::Acquire {
            consumer: self.op.to_owned(),
            max_wait_ms: self.plan.max_wait_ms,
            ..pb::Acquire::default()
        };
        let _ = tx
            .send(pb::LeaseRequest {
                kind: Some(RequestKind::Acquire(acquire)),
            })
            .await;
        let mut requests = Some(tx);
        let response = tokio::select! {
            response = client.acquire_lease(ReceiverStream::new(rx)) => response,
            () = self.shared.stop.cancelled() => {
                self.record(Ev::Dropped);
                return false;
            }
        };
        let mut events = match response {
            Ok(response) => response.into_inner(),
            Err(status) => return self.ended(Err(status)),
        };
        let blackhole_at = match self.plan.blackhole {
            Some(Blackhole::After(after)) => Some(started + after),
            _ => None,
        };
        let token = match self
            .wait(&mut events, &mut requests, started, blackhole_at)
            .await
        {
            Waited::Granted(token) => token,
            Waited::GrantedAfterCancel => return self.ended(drain(&mut events).await),
            Waited::Over(reconnect) => return reconnect,
        };

        let read = match &self.shared.counter {
            Some(counter) => {
                let counter = counter.clone();
                let value = tokio::task::spawn_blocking(move || counter.read(token))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten();
                self.record(Ev::Read { token, value });
                value
            }
            None => None,
        };
        if matches!(self.plan.blackhole, Some(Blackhole::Holding)) {
            return self.blackhole().await;
        }
        // A careful client: it stops working when its lease ends.
        tokio::select! {
            () = tokio::time::sleep(self.plan.hold) => {}
            message = events.message() => return self.ended(message),
            () = sleep_until(blackhole_at) => return self.blackhole().await,
            () = self.shared.stop.cancelled() => {
                self.record(Ev::Dropped);
                return false;
            }
        }
        if let (Some(counter), Some(value)) = (&self.shared.counter, read) {
            let counter = counter.clone();
            let accepted = tokio::task::spawn_blocking(move || counter.write(token, value + 1))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(false);
            self.record(Ev::Write {
                token,
                value: value + 1,
                accepted,
            });
        }
        match self.plan.end {
            Ending::Release => {
                self.record(Ev::ReleaseSent);
                if let Some(tx) = &requests {
                    let _ = tx
                        .send(pb::LeaseRequest {
                            kind: Some(RequestKind::Release(pb::Release {})),
                        })
                        .await;
                }
            }
            Ending::HalfClose => {
                self.record(Ev::ReleaseSent);
                requests = None;
            }
            Ending::Drop => {
                self.record(Ev::Dropped);
                return false;
            }
        }
        let end = drain(&mut events).await;
        drop(requests);
        self.ended(end)
    }

    /// Waits for the grant, cancelling or blackholing on plan.
    async fn wait(
        &self,
        events: &mut tonic::Streaming<pb::LeaseEvent>,
        requests: &mut Option<mpsc::Sender<pb::LeaseRequest>>,
        started: Instant,
        blackhole_at: Option<Instant>,
    ) -> Waited {
        let mut first = true;
        let mut cancel = self.plan.cancel;
        let mut cancelled = false;
        loop {
            let cancel_at = cancel.map(|(after, _)| started + after);
            tokio::select! {
                message = events.message() => match message {
                    Ok(Some(event)) => {
                        if std::mem::take(&mut first) {
                            self.record(Ev::FirstEvent);
                        }
                        if let Some(EventKind::Granted(granted)) = event.kind {
                            self.record(Ev::Granted {
                                token: granted.fencing_token,
                                lease_id: granted.lease_id,
                                epoch: granted.broker_epoch,
                            });
                            return if cancelled {
                                Waited::GrantedAfterCancel
                            } else {
                                Waited::Granted(granted.fencing_token)
                            };
                        }
                    }
                    other => return Waited::Over(self.ended(other)),
                },
                () = sleep_until(cancel_at) => {
                    let (_, how) = cancel.take().expect("a planned cancel");
                    match how {
                        Ending::Release => {
                            self.record(Ev::CancelSent);
                            if let Some(tx) = requests.as_ref() {
                                let _ = tx.send(pb::LeaseRequest {
                                    kind: Some(RequestKind::Release(pb::Release {})),
                                }).await;
                            }
                        }
                        Ending::HalfClose => {
                            self.record(Ev::CancelSent);
                            *requests = None;
                        }
                        Ending::Drop => {
                            self.record(Ev::Dropped);
                            return Waited::Over(false);
                        }
                    }
                    cancelled = true;
                },
                () = sleep_until(blackhole_at) => return Waited::Over(self.blackhole().await),
                () = self.shared.stop.cancelled() => {
                    self.record(Ev::Dropped);
                    return Waited::Over(false);
                }
            }
        }
    }

    /// Cuts the client's connection off at the proxy, then gives the call up
    /// once the broker must have noticed.
    async fn blackhole(&self) -> bool {
        let Some(proxy) = self.proxy else {
            return false;
        };
        self.record(Ev::Fault {
            fault: FaultKind::Blackhole,
        });
        proxy.blackhole();
        tokio::time::sleep(BLACKHOLE_ABANDON).await;
        self.record(Ev::Dropped);
        true
    }
}

/// Reads events until the call ends (5 s at most).
async fn drain(
    events: &mut tonic::Streaming<pb::LeaseEvent>,
) -> Result<Option<pb::LeaseEvent>, tonic::Status> {
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.message().await {
                Ok(Some(_)) => {}
                other => return other,
            }
        }
    })
    .await;
    ended.unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no end within 5 s")))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Keeps worker and `gpulease run` processes running until the stop, then
/// waits for them (killing stragglers).
async fn process_loop(shared: Arc<Shared>, config: Config, mut rng: Rng) {
    let mut ticks = tokio::time::interval(Duration::from_millis(25));
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shared.stop.cancelled() => break,
        }
        let Some(target) = shared.target.borrow().clone() else {
            continue;
        };
        let (workers, clis) = {
            let children = shared.children.lock().unwrap();
            let cli = children
                .values()
                .filter(|c| c.kind == ClientKind::Cli)
                .count();
            (children.len() - cli, cli)
        };
        if workers < config.workers {
            spawn_worker(&shared, &target, &mut rng);
        }
        if clis < config.cli {
            spawn_cli(&shared, &target, &mut rng);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !shared.children.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stragglers: Vec<(i32, String)> = shared
        .children
        .lock()
        .unwrap()
        .iter()
        .map(|(pid, child)| (*pid, child.op.clone()))
        .collect();
    for (pid, op) in stragglers {
        shared.recorder.record(
            &op,
            Ev::Fault {
                fault: FaultKind::CleanupKill,
            },
        );
        signal(pid, Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !shared.children.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The environment of a worker process for `op`.
fn worker_env(shared: &Shared, op: &str, hold_ms: u64) -> Vec<(&'static str, std::ffi::OsString)> {
    let mut env = vec![
        (worker::OP, op.into()),
        (
            worker::FILE,
            shared
                .histories
                .join(format!("{op}.jsonl"))
                .into_os_string(),
        ),
        (worker::HOLD_MS, hold_ms.to_string().into()),
    ];
    if let Some(path) = &shared.counter_path {
        env.push((worker::COUNTER, path.clone().into_os_string()));
    }
    env
}

fn spawn_worker(shared: &Arc<Shared>, target: &Target, rng: &mut Rng) {
    let op = shared.op_name("w");
    let max_wait = if rng.chance(0.15) {
        rng.range(300, 3000)
    } else {
        0
    };
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut command = Command::new(exe);
    command
        .envs(worker_env(shared, &op, rng.range(30, 200)))
        .env(worker::ROLE, "client")
        .env(worker::ADDR, &target.addr)
        .env(worker::INSTANCE, target.instance.to_string())
        .env(worker::MAX_WAIT_MS, max_wait.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    if let Ok(child) = command.spawn() {
        adopt(shared, child, op, ClientKind::Worker);
    }
}

fn spawn_cli(shared: &Arc<Shared>, target: &Target, rng: &mut Rng) {
    let op = shared.op_name("r");
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut command = Command::new(BIN);
    command.args([
        "run",
        "--quiet",
        "--consumer",
        &op,
        "--broker",
        &target.addr,
    ]);
    // Half of them keep their command running when the lease is lost, like
    // a process that ignores the broker.
    if rng.chance(0.5) {
        command.arg("--no-kill-on-loss");
    }
    command
        .arg("--")
        .arg(exe)
        .envs(worker_env(shared, &op, rng.range(30, 150)))
        .env(worker::ROLE, "command")
        .env_remove("GPULEASE_BROKER")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let t = now_ns();
    if let Ok(child) = command.spawn() {
        let pid = child.id().unwrap_or(0);
        shared.recorder.record_at(
            t,
            &op,
            Ev::Invoke {
                instance: target.instance,
                pid,
                max_wait_ms: 0,
                client: ClientKind::Cli,
            },
        );
        adopt(shared, child, op, ClientKind::Cli);
    }
}

/// Registers a child and reaps it when it exits.
fn adopt(shared: &Arc<Shared>, mut child: tokio::process::Child, op: String, kind: ClientKind) {
    let Some(pid) = child.id().map(|id| id as i32) else {
        return;
    };
    shared.children.lock().unwrap().insert(
        pid,
        ChildInfo {
            op: op.clone(),
            kind,
            stopped: false,
        },
    );
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let status = child.wait().await;
        if kind == ClientKind::Cli {
            let code = status.map_or_else(|e| e.to_string(), |s| s.to_string());
            shared.recorder.record(&op, Ev::Ended { code });
        }
        shared.children.lock().unwrap().remove(&pid);
    });
}

/// SIGKILLs or SIGSTOPs worker and `gpulease run` processes while they
/// hold (mostly) or wait, as the broker's Status says, one fault every few
/// hundred milliseconds at most.
async fn injector_loop(shared: Arc<Shared>, mut rng: Rng) {
    let mut quiet_until = Instant::now();
    loop {
        let pause = Duration::from_millis(rng.range(40, 90));
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shared.stop.cancelled() => return,
        }
        if Instant::now() < quiet_until {
            continue;
        }
        let Some(target) = shared.target.borrow().clone() else {
            continue;
        };
        let Ok(status) = broker::status(&target.addr).await else {
            continue;
        };
        let ours = |pids: &mut dyn Iterator<Item = u32>| -> Vec<i32> {
            let children = shared.children.lock().unwrap();
            pids.map(|pid| pid as i32)
                .filter(|pid| children.get(pid).is_some_and(|c| !c.stopped))
                .collect()
        };
        let holders = ours(&mut status.holders.iter().map(|h| h.client_pid));
        let waiters = ours(&mut status.waiters.iter().map(|w| w.client_pid));
        let (pool, stop) = if !holders.is_empty() && rng.chance(0.6) {
            (holders, rng.chance(0.4))
        } else if !waiters.is_empty() && rng.chance(0.15) {
            (waiters, rng.chance(0.5))
        } else {
            continue;
        };
        quiet_until = Instant::now() + Duration::from_millis(rng.range(300, 900));
        let pid = pool[rng.range(0, pool.len() as u64) as usize];
        let Some(op) = shared
            .children
            .lock()
            .unwrap()
            .get(&pid)
            .map(|c| c.op.clone())
        else {
            continue;
        };
        if !stop {
            shared.recorder.record(
                &op,
                Ev::Fault {
                    fault: FaultKind::Kill,
                },
            );
            signal(pid, Signal::SIGKILL);
            continue;
        }
        shared.recorder.record(
            &op,
            Ev::Fault {
                fault: FaultKind::Stop,
            },
        );
        signal(pid, Signal::SIGSTOP);
        if let Some(child) = shared.children.lock().unwrap().get_mut(&pid) {
            child.stopped = true;
        }
        let frozen = Duration::from_millis(rng.range(2500, 3500));
        let wake = rng.chance(0.5);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            tokio::time::sleep(frozen).await;
            if !shared.children.lock().unwrap().contains_key(&pid) {
                return;
            }
            if wake {
                shared.recorder.record(
                    &op,
                    Ev::Fault {
                        fault: FaultKind::Cont,
                    },
                );
                signal(pid, Signal::SIGCONT);
                if let Some(child) = shared.children.lock().unwrap().get_mut(&pid) {
                    child.stopped = false;
                }
            } else {
                shared.recorder.record(
                    &op,
                    Ev::Fault {
                        fault: FaultKind::Kill,
                    },
                );
                signal(pid, Signal::SIGKILL);
                signal(pid, Signal::SIGCONT);
            }
        });
    }
}
