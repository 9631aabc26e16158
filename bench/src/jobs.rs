//! The hidden `worker` mode: each client process of a run, and the echo
//! server, is this binary started again with one [`Job`].
//!
//! The orchestrator steers a worker through its standard input, one command
//! a line, and reads its standard output: `ready` once it is connected, `ok`
//! after each command that takes effect in steps, and as the last line its
//! result as JSON. Every job stops by itself: after its iterations, when
//! the orchestrator says `stop` or closes standard input, or when the time
//! limit the orchestrator gave it has passed.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use gpulease_client::pb::v1 as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::calls::{Answer, Call, Client, connect};
use crate::{echo, locks};
use gpulease_testkit::clock::now_ns;

/// How long opening a batch of queue slots may take, at most.
const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(120);

/// How many acquire→release cycles one contending client runs at most,
/// whatever its time limit.
const MAX_CYCLES: u64 = 10_000_000;

/// What one worker process does.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "snake_case")]
pub(crate) enum Job {
    /// Serves a baseline (see `echo`) on an ephemeral TCP port and on
    /// `socket` until standard input closes.
    Echo {
        /// What it does.
        mode: echo::Mode,
        /// The Unix socket to serve on.
        socket: PathBuf,
    },
    /// Holds places in the broker's queue, for the handoff and memory
    /// measurements. `enq N` opens N more `AcquireLease` calls and answers
    /// `ok` once each has its first answer; `go TARGET LIMIT_MS` starts the
    /// rotation: each slot that is granted opens its next call, then
    /// releases, until a grant's token reaches TARGET. Result:
    /// [`SlotRecords`].
    Slots {
        /// The broker.
        address: String,
        /// The consumer name of every slot.
        consumer: String,
        /// How many connections the slots are spread over.
        channels: usize,
    },
    /// One service of the sharing benchmark (see `sharing::consumer`).
    Consumer(crate::sharing::consumer::ConsumerSpec),
    /// Sequential unary `Status` calls. Result: [`Latencies`] (`first`).
    Unary {
        /// The server.
        address: String,
        /// Measured calls.
        iterations: usize,
        /// Calls before those, not measured.
        warmup: usize,
    },
    /// Round trips on one bidi `AcquireLease` stream of the echo server.
    /// Result: [`Latencies`] (`first`).
    PingPong {
        /// The echo server.
        address: String,
        /// Measured round trips.
        iterations: usize,
        /// Round trips before those, not measured.
        warmup: usize,
    },
    /// Uncontended leases, one after another: open → `Granted` (`first`)
    /// and open → the stream's end after `Release` (`second`). Result:
    /// [`Latencies`].
    Acquire {
        /// The broker, or the echo server for the baseline.
        address: String,
        /// The consumer name.
        consumer: String,
        /// Measured leases.
        iterations: usize,
        /// Leases before those, not measured.
        warmup: usize,
    },
    /// Contending clients, each on its own connection, each acquiring and
    /// releasing at once in a loop. `go LIMIT_MS` starts them, `stop` stops
    /// them. Result: [`Contended`].
    Contend {
        /// The broker.
        address: String,
        /// The consumer name.
        consumer: String,
        /// How many clients in this process.
        clients: usize,
    },
    /// `flock(2)` on `path`, taken and given back `iterations` times.
    /// Result: [`LockEvents`].
    Flock {
        /// The lock file, shared by the two workers.
        path: PathBuf,
        /// How many times to take the lock.
        iterations: usize,
        /// How long to hold it, so that the other worker waits in the
        /// kernel by the time it is released.
        hold_us: u64,
        /// How long to stay away after releasing, so that the waiter, not
        /// the releaser, takes it next.
        gap_us: u64,
    },
    /// An etcd lease-backed lock, taken and given back `iterations` times
    /// through etcd's JSON gateway. Result: [`LockEvents`].
    EtcdHandoff {
        /// `127.0.0.1:PORT` of etcd's client URL.
        endpoint: String,
        /// The lock's name.
        name: String,
        /// How many times to take the lock.
        iterations: usize,
        /// How long to hold it, so that the other worker has been waiting
        /// a while when it is released.
        hold_ms: u64,
    },
    /// Uncontended etcd lock (`first`) and lock → unlock (`second`).
    /// Result: [`Latencies`].
    EtcdCycle {
        /// `127.0.0.1:PORT` of etcd's client URL.
        endpoint: String,
        /// The lock's name.
        name: String,
        /// Measured cycles.
        iterations: usize,
        /// Cycles before those, not measured.
        warmup: usize,
    },
}

/// Latency samples in nanoseconds.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Latencies {
    /// The job's first measure.
    pub(crate) first: Vec<u64>,
    /// The job's second measure, if it has one.
    pub(crate) second: Vec<u64>,
}

/// What the slots of one process saw.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct SlotRecords {
    /// One record per grant.
    pub(crate) records: Vec<SlotRecord>,
    /// Calls that failed.
    pub(crate) errors: u64,
    /// Position updates (`Queued` after the first answer) received.
    pub(crate) updates: u64,
}

/// One lease held by a slot.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub(crate) struct SlotRecord {
    /// Its fencing token.
    pub(crate) token: u64,
    /// When `Granted` was read.
    pub(crate) granted_ns: u64,
    /// When `Release` was sent, if it was.
    pub(crate) released_ns: Option<u64>,
}

/// What the contending clients of one process did.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Contended {
    /// Grants received.
    pub(crate) grants: u64,
    /// Calls that failed.
    pub(crate) errors: u64,
}

/// The takes and gives of a lock by one process.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct LockEvents {
    /// In the order they happened.
    pub(crate) events: Vec<LockEvent>,
}

/// A lock taken or given back.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub(crate) struct LockEvent {
    /// Taken (`true`) or given back.
    pub(crate) taken: bool,
    /// When, on the shared clock: just after taking, just before giving.
    pub(crate) at_ns: u64,
}

/// Runs the job given as JSON and prints its result.
pub(crate) fn main(spec: &str) -> ExitCode {
    let job: Job = match serde_json::from_str(spec) {
        Ok(job) => job,
        Err(e) => {
            eprintln!("gpulease-bench worker: bad job {spec:?}: {e}");
            return ExitCode::from(64);
        }
    };
    let result = match job {
        Job::Flock {
            path,
            iterations,
            hold_us,
            gap_us,
        } => locks::flock(&path, iterations, hold_us, gap_us).and_then(json),
        Job::EtcdHandoff {
            endpoint,
            name,
            iterations,
            hold_ms,
        } => locks::etcd_handoff(&endpoint, &name, iterations, hold_ms).and_then(json),
        Job::EtcdCycle {
            endpoint,
            name,
            iterations,
            warmup,
        } => locks::etcd_cycle(&endpoint, &name, iterations, warmup).and_then(json),
        job => {
            // The same runtime as the broker and the CLI: multi-threaded,
            // one worker thread per core.
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("gpulease-bench worker: cannot start a runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = runtime.block_on(run(job));
            runtime.shutdown_background();
            result
        }
    };
    match result {
        Ok(line) => {
            if !line.is_empty() {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gpulease-bench worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn json<T: Serialize>(value: T) -> Result<String> {
    Ok(serde_json::to_string(&value)?)
}

async fn run(job: Job) -> Result<String> {
    match job {
        Job::Echo { mode, socket } => echo::serve(mode, &socket, commands())
            .await
            .map(|()| String::new()),
        Job::Slots {
            address,
            consumer,
            channels,
        } => json(slots(&address, consumer, channels).await?),
        Job::Unary {
            address,
            iterations,
            warmup,
        } => json(unary(&address, iterations, warmup).await?),
        Job::PingPong {
            address,
            iterations,
            warmup,
        } => json(ping_pong(&address, iterations, warmup).await?),
        Job::Acquire {
            address,
            consumer,
            iterations,
            warmup,
        } => json(acquire(&address, &consumer, iterations, warmup).await?),
        Job::Contend {
            address,
            consumer,
            clients,
        } => json(contend(&address, consumer, clients).await?),
        Job::Consumer(spec) => crate::sharing::consumer::run(spec).await,
        Job::Flock { .. } | Job::EtcdHandoff { .. } | Job::EtcdCycle { .. } => {
            bail!("not an async job")
        }
    }
}

/// Tells the orchestrator something: one line on standard output.
fn say(line: &str) {
    println!("{line}");
}

/// The orchestrator's commands, one a line; the channel closes at EOF.
/// A plain thread reads them: standard input blocks.
pub(crate) fn commands() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { return };
            if tx.blocking_send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Cancels `stop` once `limit_ms` has passed: every job ends in time.
fn stop_after(stop: &CancellationToken, limit_ms: u64) {
    let stop = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(limit_ms)).await;
        stop.cancel();
    });
}

fn number<T: std::str::FromStr>(word: Option<&str>, line: &str) -> Result<T> {
    word.and_then(|w| w.parse().ok())
        .with_context(|| format!("bad command {line:?}"))
}

async fn unary(address: &str, iterations: usize, warmup: usize) -> Result<Latencies> {
    let mut client = connect(address).await?;
    let mut samples = Latencies::default();
    for i in 0..warmup + iterations {
        let start = now_ns();
        client.status(pb::StatusRequest::default()).await?;
        if i >= warmup {
            samples.first.push(now_ns() - start);
        }
    }
    Ok(samples)
}

async fn ping_pong(address: &str, iterations: usize, warmup: usize) -> Result<Latencies> {
    let client = connect(address).await?;
    let mut call = Call::open(&client, "bench-echo").await?;
    call.granted().await?;
    let mut samples = Latencies::default();
    for i in 0..warmup + iterations {
        let start = now_ns();
        let pong = call.ping().await?;
        if i >= warmup {
            samples.first.push(pong.at_ns - start);
        }
    }
    call.release().await.end().await?;
    Ok(samples)
}

async fn acquire(
    address: &str,
    consumer: &str,
    iterations: usize,
    warmup: usize,
) -> Result<Latencies> {
    let client = connect(address).await?;
    let mut samples = Latencies::default();
    for i in 0..warmup + iterations {
        let start = now_ns();
        let mut call = Call::open(&client, consumer).await?;
        let granted = call.granted().await?;
        call.release().await.end().await?;
        let ended = now_ns();
        if i >= warmup {
            samples.first.push(granted.at_ns - start);
            samples.second.push(ended - start);
        }
    }
    Ok(samples)
}

/// The state the slots of one process share.
struct Slots {
    /// `Some(target token)` once the rotation may start.
    go: watch::Sender<Option<u64>>,
    stop: CancellationToken,
    records: Mutex<Vec<SlotRecord>>,
    errors: AtomicU64,
    updates: AtomicU64,
}

impl Slots {
    fn record(&self, record: SlotRecord) {
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(record);
    }
}

async fn slots(address: &str, consumer: String, channels: usize) -> Result<SlotRecords> {
    let mut clients = Vec::new();
    for _ in 0..channels.max(1) {
        clients.push(connect(address).await?);
    }
    let shared = Arc::new(Slots {
        go: watch::Sender::new(None),
        stop: CancellationToken::new(),
        records: Mutex::new(Vec::new()),
        errors: AtomicU64::new(0),
        updates: AtomicU64::new(0),
    });
    let mut commands = commands();
    let mut tasks = JoinSet::new();
    let mut opened_so_far = 0usize;
    say("ready");
    loop {
        let line = tokio::select! {
            () = shared.stop.cancelled() => break,
            line = commands.recv() => match line {
                Some(line) => line,
                None => break,
            },
        };
        let mut words = line.split_whitespace();
        match words.next() {
            Some("enq") => {
                let n: usize = number(words.next(), &line)?;
                let (opened, mut done) = mpsc::channel(n.max(1));
                for _ in 0..n {
                    let client = clients[opened_so_far % clients.len()].clone();
                    opened_so_far += 1;
                    tasks.spawn(slot(
                        client,
                        consumer.clone(),
                        Arc::clone(&shared),
                        opened.clone(),
                    ));
                }
                drop(opened);
                for _ in 0..n {
                    tokio::time::timeout(ENQUEUE_TIMEOUT, done.recv())
                        .await
                        .context("slots took too long to open")?
                        .context("a slot failed to open")?;
                }
                say("ok");
            }
            Some("go") => {
                let target: u64 = number(words.next(), &line)?;
                let limit_ms: u64 = number(words.next(), &line)?;
                stop_after(&shared.stop, limit_ms);
                shared.go.send_replace(Some(target));
            }
            Some("stop") => break,
            _ => bail!("unknown command {line:?}"),
        }
    }
    shared.stop.cancel();
    let records = std::mem::take(
        &mut *shared
            .records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    );
    Ok(SlotRecords {
        records,
        errors: shared.errors.load(Ordering::Relaxed),
        updates: shared.updates.load(Ordering::Relaxed),
    })
}

/// One place in the queue. Reports on `opened` once its first call has its
/// first answer; when granted after `go`, opens its next call (so the queue
/// keeps its length), then releases the lease it holds.
async fn slot(client: Client, consumer: String, shared: Arc<Slots>, opened: mpsc::Sender<()>) {
    let stop = shared.stop.clone();
    let rotation = rotate(&client, &consumer, &shared, opened);
    if let Some(Err(_)) = stop.run_until_cancelled(rotation).await {
        shared.errors.fetch_add(1, Ordering::Relaxed);
    }
}

async fn rotate(
    client: &Client,
    consumer: &str,
    shared: &Slots,
    opened: mpsc::Sender<()>,
) -> Result<()> {
    let mut call = Call::open(client, consumer).await?;
    let mut answer = call.answer().await?;
    let _ = opened.send(()).await;
    drop(opened);
    let mut go = shared.go.subscribe();
    // Bounded by the go command's time limit, which cancels `stop`.
    loop {
        let granted = match answer {
            Answer::Granted(granted) => granted,
            Answer::Queued => call.granted_counting(&shared.updates).await?,
        };
        let target = (*go.wait_for(Option::is_some).await?).unwrap_or(0);
        if granted.token >= target {
            shared.record(SlotRecord {
                token: granted.token,
                granted_ns: granted.at_ns,
                released_ns: None,
            });
            shared.stop.cancel();
            return Ok(());
        }
        let mut next = Call::open(client, consumer).await?;
        answer = next.answer().await?;
        let released_ns = now_ns();
        shared.record(SlotRecord {
            token: granted.token,
            granted_ns: granted.at_ns,
            released_ns: Some(released_ns),
        });
        if call.release().await.end().await.is_err() {
            shared.errors.fetch_add(1, Ordering::Relaxed);
        }
        call = next;
    }
}

async fn contend(address: &str, consumer: String, clients: usize) -> Result<Contended> {
    let mut connections = Vec::new();
    for _ in 0..clients {
        connections.push(connect(address).await?);
    }
    let stop = CancellationToken::new();
    let grants = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    let mut commands = commands();
    say("ready");
    loop {
        let line = tokio::select! {
            () = stop.cancelled() => break,
            line = commands.recv() => match line {
                Some(line) => line,
                None => break,
            },
        };
        let mut words = line.split_whitespace();
        match words.next() {
            Some("go") => {
                let limit_ms: u64 = number(words.next(), &line)?;
                stop_after(&stop, limit_ms);
                for client in connections.drain(..) {
                    tasks.spawn(contend_loop(
                        client,
                        consumer.clone(),
                        stop.clone(),
                        Arc::clone(&grants),
                        Arc::clone(&errors),
                    ));
                }
            }
            Some("stop") => break,
            _ => bail!("unknown command {line:?}"),
        }
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(Contended {
        grants: grants.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
    })
}

/// Acquires and releases at once, again and again, until `stop`. A client
/// whose call fails stops: the broker is not asked to absorb retries.
async fn contend_loop(
    client: Client,
    consumer: String,
    stop: CancellationToken,
    grants: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) {
    for _ in 0..MAX_CYCLES {
        let cycle = async {
            let mut call = Call::open(&client, &consumer).await?;
            call.granted().await?;
            grants.fetch_add(1, Ordering::Relaxed);
            // Read the stream's end on the side, as a client that moves on
            // to its next job would.
            tokio::spawn(call.release().await.end());
            anyhow::Ok(())
        };
        match stop.run_until_cancelled(cycle).await {
            None => return,
            Some(Ok(())) => {}
            Some(Err(_)) => {
                errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}
