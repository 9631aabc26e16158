//! What a run measures, one scenario at a time, each on fresh servers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gpulease_client::pb::v1 as pb;

use crate::calls::connect;
use crate::echo::Mode;
use crate::jobs::{Contended, Job, Latencies, LockEvent, LockEvents, SlotRecord, SlotRecords};
use crate::procs::{Scratch, Server, Transport, Worker, run_job, terminate};
use crate::report::{
    EtcdOutcome, HandoffPoint, MemoryPoint, ThroughputPoint, TransportBaselines, Uncontended,
};
use crate::stats::Summary;

/// How many `AcquireLease` streams a worker puts on one connection.
const STREAMS_PER_CHANNEL: usize = 1_000;

/// How many processes the contending clients are spread over, at most.
const MAX_CONTEND_PROCESSES: usize = 8;

/// How long a worker may take to connect, or to answer one step.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a measuring job may run, at most.
const JOB_TIMEOUT: Duration = Duration::from_secs(300);

/// How many iterations and sizes a run uses.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct Plan {
    /// The wire baselines, the uncontended figures and the handoffs at the
    /// fewest waiters are measured in this many interleaved rounds, so that
    /// a burst of load on a shared machine hits figure and baseline alike.
    pub(crate) rounds: usize,
    /// Measured round trips, acquires and cycles per latency figure.
    pub(crate) iterations: usize,
    /// Unmeasured ones before them.
    pub(crate) warmup: usize,
    /// Measured handoffs per queue length.
    pub(crate) handoffs: usize,
    /// Unmeasured handoffs before them.
    pub(crate) handoff_warmup: usize,
    /// The numbers of other waiters queued during a handoff.
    pub(crate) queue_sizes: Vec<usize>,
    /// `Status` calls per queue length.
    pub(crate) status_calls: usize,
    /// The numbers of contending clients.
    pub(crate) clients: Vec<usize>,
    /// The broker capacities for the throughput runs.
    pub(crate) capacities: Vec<u32>,
    /// Contention before the throughput is measured.
    pub(crate) throughput_warmup: Duration,
    /// How long the throughput is measured.
    pub(crate) throughput_window: Duration,
    /// The numbers of queued waiters whose memory is measured.
    pub(crate) memory_sizes: Vec<usize>,
    /// `flock` takes per worker.
    pub(crate) flock_iterations: usize,
    /// etcd lock handoffs per worker.
    pub(crate) etcd_handoffs: usize,
    /// How long an etcd worker holds the lock.
    pub(crate) etcd_hold_ms: u64,
    /// Measured uncontended etcd lock cycles.
    pub(crate) etcd_cycles: usize,
}

impl Plan {
    /// The full run of BENCHMARKS.md: a few minutes on two cores.
    pub(crate) fn full() -> Self {
        Self {
            rounds: 4,
            iterations: 2_000,
            warmup: 200,
            handoffs: 2_000,
            handoff_warmup: 200,
            queue_sizes: vec![1, 100, 1_000, 10_000],
            status_calls: 100,
            clients: vec![1, 8, 64, 512],
            capacities: vec![1, 4],
            throughput_warmup: Duration::from_millis(500),
            throughput_window: Duration::from_secs(2),
            memory_sizes: vec![0, 1_000, 10_000],
            flock_iterations: 1_000,
            etcd_handoffs: 30,
            etcd_hold_ms: 250,
            etcd_cycles: 200,
        }
    }

    /// A few iterations of everything, so that the benchmark cannot rot.
    pub(crate) fn quick() -> Self {
        Self {
            rounds: 2,
            iterations: 20,
            warmup: 2,
            handoffs: 20,
            handoff_warmup: 2,
            queue_sizes: vec![1, 20],
            status_calls: 5,
            clients: vec![1, 4],
            capacities: vec![1, 2],
            throughput_warmup: Duration::from_millis(50),
            throughput_window: Duration::from_millis(200),
            memory_sizes: vec![0, 20],
            flock_iterations: 10,
            etcd_handoffs: 3,
            etcd_hold_ms: 250,
            etcd_cycles: 5,
        }
    }
}

/// Where the programs are, and the run's scratch space.
#[derive(Debug)]
pub(crate) struct Bench {
    /// This binary, for workers.
    pub(crate) exe: PathBuf,
    /// `gpulease`.
    pub(crate) broker_bin: PathBuf,
    /// A command to start the servers under (a profiler), if any.
    pub(crate) server_wrapper: Vec<String>,
    /// The servers' log (their standard error).
    pub(crate) log: PathBuf,
    /// The sizes.
    pub(crate) plan: Plan,
    scratch: Scratch,
    servers: u32,
}

impl Bench {
    /// A bench that starts `broker_bin` and re-executes `exe`.
    pub(crate) fn new(
        exe: PathBuf,
        broker_bin: PathBuf,
        server_wrapper: Vec<String>,
        log: PathBuf,
        plan: Plan,
    ) -> Result<Self> {
        Ok(Self {
            exe,
            broker_bin,
            server_wrapper,
            log,
            plan,
            scratch: Scratch::new()?,
            servers: 0,
        })
    }

    fn socket(&mut self, what: &str) -> PathBuf {
        self.servers += 1;
        self.scratch.path(&format!("{what}-{}.sock", self.servers))
    }

    async fn broker(&mut self, capacity: u32) -> Result<Server> {
        let socket = self.socket("broker");
        let state_dir = socket.with_extension("state");
        Server::broker(
            &self.broker_bin,
            &self.server_wrapper,
            capacity,
            &socket,
            &state_dir,
            &self.log,
        )
        .await
        .with_context(|| format!("cannot start {}", self.broker_bin.display()))
    }

    async fn latencies(&self, name: &str, job: Job) -> Result<Latencies> {
        run_job(&self.exe, name, &job, JOB_TIMEOUT).await
    }

    /// The latency figures at the fewest waiters on `transport`, each with
    /// its baseline, in [`Plan::rounds`] interleaved rounds: the echo
    /// server's round trips, the broker's uncontended acquire, and handoffs
    /// through the bare semaphore and through the broker.
    pub(crate) async fn latency_rounds(&mut self, transport: Transport) -> Result<LatencyFigures> {
        let socket = self.socket("echo");
        let echo = Server::baseline(
            &self.exe,
            &self.server_wrapper,
            Mode::Echo,
            &socket,
            &self.log,
        )
        .await?;
        let rounds = self.plan.rounds.max(1);
        let iterations = self.plan.iterations.div_ceil(rounds);
        let warmup = self.plan.warmup.div_ceil(rounds);
        let others = self.plan.queue_sizes.iter().copied().min().unwrap_or(1);
        let (mut bidi, mut unary, mut echo_acquire, mut solo) = Default::default();
        let (mut semaphore, mut handoff) = (Rotation::default(), Rotation::default());
        for _ in 0..rounds {
            let address = echo.address(transport).to_owned();
            let job = Job::PingPong {
                address: address.clone(),
                iterations,
                warmup,
            };
            absorb(&mut bidi, self.latencies("ping-pong", job).await?);
            let job = Job::Unary {
                address: address.clone(),
                iterations,
                warmup,
            };
            absorb(&mut unary, self.latencies("unary", job).await?);
            let job = Job::Acquire {
                address,
                consumer: "bench-echo".into(),
                iterations,
                warmup,
            };
            absorb(
                &mut echo_acquire,
                self.latencies("echo-acquire", job).await?,
            );
            let broker = self.broker(1).await?;
            let job = Job::Acquire {
                address: broker.address(transport).to_owned(),
                consumer: "bench-solo".into(),
                iterations,
                warmup,
            };
            absorb(&mut solo, self.latencies("acquire", job).await?);
            broker.stop().await?;
            let handoffs = self.plan.handoffs.div_ceil(rounds);
            semaphore.absorb(
                self.semaphore_rotation(transport, others, 1, handoffs)
                    .await?,
            );
            handoff.absorb(self.broker_rotation(transport, others, handoffs).await?);
        }
        echo.stop().await?;
        Ok(LatencyFigures {
            wire: TransportBaselines {
                transport,
                bidi_rtt: summary(&bidi.first, "bidi round trips")?,
                unary_rtt: summary(&unary.first, "unary round trips")?,
                echo_acquire: summary(&echo_acquire.first, "echo acquires")?,
                echo_cycle: summary(&echo_acquire.second, "echo cycles")?,
            },
            uncontended: Uncontended {
                transport,
                acquire: summary(&solo.first, "acquires")?,
                cycle: summary(&solo.second, "cycles")?,
            },
            semaphore: semaphore.point(transport, others)?,
            handoff: handoff.point(transport, others)?,
        })
    }

    /// `flock(2)` handed between two processes.
    pub(crate) async fn flock(&mut self) -> Result<Summary> {
        let path = self.scratch.path("flock");
        let job = Job::Flock {
            path,
            iterations: self.plan.flock_iterations,
            hold_us: 1_000,
            gap_us: 200,
        };
        let a = Worker::spawn(&self.exe, "flock-a", &job)?;
        let b = Worker::spawn(&self.exe, "flock-b", &job)?;
        let a: LockEvents = a.finish(JOB_TIMEOUT).await?;
        let b: LockEvents = b.finish(JOB_TIMEOUT).await?;
        summary(&join_lock_handoffs(&[a.events, b.events]), "flock handoffs")
    }

    /// etcd's lock, if an `etcd` binary is at hand.
    pub(crate) async fn etcd(&mut self, etcd_bin: Option<&Path>) -> EtcdOutcome {
        let Some(bin) = etcd_bin else {
            return EtcdOutcome::NotInstalled;
        };
        match self.etcd_with(bin).await {
            Ok(outcome) => outcome,
            Err(e) => EtcdOutcome::Failed {
                error: format!("{e:#}"),
            },
        }
    }

    async fn etcd_with(&mut self, bin: &Path) -> Result<EtcdOutcome> {
        let version = std::process::Command::new(bin)
            .arg("--version")
            .output()
            .ok()
            .and_then(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .next()
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let data = self.scratch.path("etcd-data");
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut etcd = tokio::process::Command::new(bin)
            .args(["--name", "bench", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("bench={peer_url}")])
            .args([
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
                "--log-level",
                "error",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start etcd")?;
        let endpoint = format!("127.0.0.1:{client_port}");
        let measured = self.etcd_measure(&endpoint).await;
        terminate(&mut etcd).await?;
        let _ = std::fs::remove_dir_all(&data);
        let (handoff, lock, cycle) = measured?;
        Ok(EtcdOutcome::Measured {
            version,
            handoff,
            lock,
            cycle,
        })
    }

    async fn etcd_measure(&self, endpoint: &str) -> Result<(Summary, Summary, Summary)> {
        // etcd prints no readiness line: ask its health endpoint, a bounded
        // number of times.
        let mut healthy = false;
        for _ in 0..200 {
            let probe = endpoint.to_owned();
            if tokio::task::spawn_blocking(move || crate::locks::etcd_healthy(&probe)).await? {
                healthy = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !healthy {
            bail!("etcd did not become healthy within 10 s");
        }
        let cycle = self
            .latencies(
                "etcd-cycle",
                Job::EtcdCycle {
                    endpoint: endpoint.to_owned(),
                    name: "bench-cycle".into(),
                    iterations: self.plan.etcd_cycles,
                    warmup: self.plan.etcd_cycles.div_ceil(10),
                },
            )
            .await?;
        let job = Job::EtcdHandoff {
            endpoint: endpoint.to_owned(),
            name: "bench-handoff".into(),
            iterations: self.plan.etcd_handoffs,
            hold_ms: self.plan.etcd_hold_ms,
        };
        let a = Worker::spawn(&self.exe, "etcd-a", &job)?;
        let b = Worker::spawn(&self.exe, "etcd-b", &job)?;
        let a: LockEvents = a.finish(JOB_TIMEOUT).await?;
        let b: LockEvents = b.finish(JOB_TIMEOUT).await?;
        Ok((
            summary(&join_lock_handoffs(&[a.events, b.events]), "etcd handoffs")?,
            summary(&cycle.first, "etcd locks")?,
            summary(&cycle.second, "etcd cycles")?,
        ))
    }

    /// Handoffs with `others` other waiters queued, through the bare
    /// semaphore (the baseline) and then through the broker.
    pub(crate) async fn queue_pair(
        &mut self,
        transport: Transport,
        others: usize,
    ) -> Result<(HandoffPoint, HandoffPoint)> {
        let handoffs = self.plan.handoffs;
        let semaphore = self
            .semaphore_rotation(transport, others, 1, handoffs)
            .await?;
        let broker = self.broker_rotation(transport, others, handoffs).await?;
        Ok((
            semaphore.point(transport, others)?,
            broker.point(transport, others)?,
        ))
    }

    async fn broker_rotation(
        &mut self,
        transport: Transport,
        others: usize,
        handoffs: usize,
    ) -> Result<Rotation> {
        let broker = self.broker(1).await?;
        let rotation = self
            .rotation(&broker, transport, others, handoffs, true)
            .await;
        broker.stop().await?;
        rotation
    }

    async fn semaphore_rotation(
        &mut self,
        transport: Transport,
        others: usize,
        permits: usize,
        handoffs: usize,
    ) -> Result<Rotation> {
        let socket = self.socket("semaphore");
        let mode = Mode::Semaphore { permits };
        let server =
            Server::baseline(&self.exe, &self.server_wrapper, mode, &socket, &self.log).await?;
        let rotation = self
            .rotation(&server, transport, others, handoffs, false)
            .await;
        server.stop().await?;
        rotation
    }

    /// Handoffs with `others` other waiters queued at the server at
    /// `address`, and `Status` at that size if `status`.
    ///
    /// `others + 1` slots, alternately in two processes, wait in the queue.
    /// Each grant goes to a slot of the other process; the slot opens its
    /// next call (at the back of the queue) and only then releases, so the
    /// queue keeps its length and every handoff crosses processes. With an
    /// odd number of slots, once per round the order wraps onto the same
    /// process: those handoffs are skipped and counted.
    ///
    /// Also reads the server's CPU time over the rotation: its cost per
    /// handoff, which depends far less on other load than latency does.
    async fn rotation(
        &self,
        server: &Server,
        transport: Transport,
        others: usize,
        handoffs: usize,
        status: bool,
    ) -> Result<Rotation> {
        let address = server.address(transport);
        let slots = others + 1;
        let channels = |n: usize| n.div_ceil(STREAMS_PER_CHANNEL).max(1);
        let mut workers = Vec::new();
        for (name, count) in [("x", slots.div_ceil(2)), ("y", slots / 2)] {
            let job = Job::Slots {
                address: address.to_owned(),
                consumer: format!("bench-{name}"),
                channels: channels(count),
            };
            let mut worker = Worker::spawn(&self.exe, &format!("slots-{name}"), &job)?;
            worker.expect("ready", STEP_TIMEOUT).await?;
            workers.push(worker);
        }
        for i in 0..slots {
            let worker = &mut workers[i % 2];
            worker.send("enq 1").await?;
            worker.expect("ok", STEP_TIMEOUT).await?;
        }
        let status = if status && self.plan.status_calls > 0 {
            let job = Job::Unary {
                address: address.to_owned(),
                iterations: self.plan.status_calls,
                warmup: self.plan.status_calls.div_ceil(10),
            };
            self.latencies("status", job).await?.first
        } else {
            Vec::new()
        };
        let first = current_token(address).await?;
        let warmup = self.plan.handoff_warmup.div_ceil(self.plan.rounds.max(1));
        let last = first + (warmup + handoffs) as u64;
        let cpu_before = server.cpu_ns()?;
        let limit = JOB_TIMEOUT;
        for worker in &mut workers {
            worker
                .send(&format!("go {last} {}", limit.as_millis()))
                .await?;
        }
        let mut records = Vec::new();
        let (mut errors, mut updates) = (0, 0);
        for worker in workers {
            let result: SlotRecords = worker.finish(limit + STEP_TIMEOUT).await?;
            errors += result.errors;
            updates += result.updates;
            records.push(result.records);
        }
        let cpu_ns = server.cpu_ns()?.saturating_sub(cpu_before);
        let (mut handoffs, same_process) = join_handoffs(&records, first, last);
        handoffs.drain(..warmup.min(handoffs.len()));
        Ok(Rotation {
            handoffs,
            status,
            same_process,
            errors,
            cpu_ns,
            grants: last - first,
            updates,
        })
    }

    /// Grants per second with `clients` clients that acquire and release at
    /// once, through a bare semaphore of `capacity` permits (the baseline)
    /// and then through a broker of `capacity`.
    pub(crate) async fn throughput(
        &mut self,
        capacity: u32,
        clients: usize,
    ) -> Result<ThroughputPoint> {
        let socket = self.socket("semaphore");
        let mode = Mode::Semaphore {
            permits: capacity as usize,
        };
        let server =
            Server::baseline(&self.exe, &self.server_wrapper, mode, &socket, &self.log).await?;
        let baseline = self.contend(&server, clients).await;
        server.stop().await?;
        let semaphore = baseline?;
        let broker = self.broker(capacity).await?;
        let measured = self.contend(&broker, clients).await;
        broker.stop().await?;
        let broker = measured?;
        Ok(ThroughputPoint {
            capacity,
            clients,
            processes: clients.clamp(1, MAX_CONTEND_PROCESSES),
            grants_per_s: broker.grants_per_s,
            semaphore_grants_per_s: semaphore.grants_per_s,
            server_cpu_us_per_grant: broker.cpu_us_per_grant,
            semaphore_cpu_us_per_grant: semaphore.cpu_us_per_grant,
            errors: broker.errors + semaphore.errors,
        })
    }

    /// Runs `clients` contending clients against `server` over TCP.
    async fn contend(&self, server: &Server, clients: usize) -> Result<Contention> {
        let address = server.address(Transport::Tcp);
        let processes = clients.clamp(1, MAX_CONTEND_PROCESSES);
        let mut workers = Vec::new();
        for p in 0..processes {
            let share = clients / processes + usize::from(p < clients % processes);
            let job = Job::Contend {
                address: address.to_owned(),
                consumer: format!("bench-c{p}"),
                clients: share,
            };
            workers.push(Worker::spawn(&self.exe, &format!("contend-{p}"), &job)?);
        }
        for worker in &mut workers {
            worker.expect("ready", STEP_TIMEOUT).await?;
        }
        let limit = self.plan.throughput_warmup + self.plan.throughput_window + STEP_TIMEOUT;
        for worker in &mut workers {
            worker.send(&format!("go {}", limit.as_millis())).await?;
        }
        tokio::time::sleep(self.plan.throughput_warmup).await;
        let mut status = connect(address).await?;
        let before = status
            .status(pb::StatusRequest::default())
            .await?
            .into_inner();
        let start = Instant::now();
        let cpu_before = server.cpu_ns()?;
        tokio::time::sleep(self.plan.throughput_window).await;
        let cpu_ns = server.cpu_ns()?.saturating_sub(cpu_before);
        let after = status
            .status(pb::StatusRequest::default())
            .await?
            .into_inner();
        let elapsed = start.elapsed();
        let mut errors = 0;
        for mut worker in workers {
            worker.send("stop").await?;
            let result: Contended = worker.finish(STEP_TIMEOUT).await?;
            errors += result.errors;
        }
        let grants = after.total_grants.saturating_sub(before.total_grants);
        Ok(Contention {
            grants_per_s: grants as f64 / elapsed.as_secs_f64(),
            cpu_us_per_grant: cpu_ns as f64 / 1_000.0 / grants.max(1) as f64,
            errors,
        })
    }

    /// The resident memory of the bare semaphore (the baseline) and of the
    /// broker with each number of waiters queued behind one holder.
    pub(crate) async fn memory(&mut self) -> Result<Vec<MemoryPoint>> {
        let socket = self.socket("semaphore");
        let mode = Mode::Semaphore { permits: 1 };
        let server =
            Server::baseline(&self.exe, &self.server_wrapper, mode, &socket, &self.log).await?;
        let baseline = self.fill(&server).await;
        server.stop().await?;
        let baseline = baseline?;
        let broker = self.broker(1).await?;
        let measured = self.fill(&broker).await;
        broker.stop().await?;
        Ok(measured?
            .into_iter()
            .zip(baseline)
            .map(
                |((waiters, rss_bytes), (_, semaphore_rss_bytes))| MemoryPoint {
                    waiters,
                    rss_bytes,
                    semaphore_rss_bytes,
                },
            )
            .collect())
    }

    /// Queues waiters at `server` behind one holder, and reads its resident
    /// memory at each size of [`Plan::memory_sizes`].
    async fn fill(&self, server: &Server) -> Result<Vec<(usize, u64)>> {
        let largest = self.plan.memory_sizes.iter().copied().max().unwrap_or(0);
        let job = Job::Slots {
            address: server.address(Transport::Tcp).to_owned(),
            consumer: "bench-m".into(),
            channels: largest.div_ceil(STREAMS_PER_CHANNEL).max(1),
        };
        let mut worker = Worker::spawn(&self.exe, "memory", &job)?;
        worker.expect("ready", STEP_TIMEOUT).await?;
        // The holder; its connections are open before the first reading.
        worker.send("enq 1").await?;
        worker.expect("ok", STEP_TIMEOUT).await?;
        let mut queued = 0;
        let mut points = Vec::new();
        let mut sizes = self.plan.memory_sizes.clone();
        sizes.sort_unstable();
        for size in sizes {
            if size > queued {
                worker.send(&format!("enq {}", size - queued)).await?;
                worker.expect("ok", JOB_TIMEOUT).await?;
                queued = size;
            }
            points.push((size, server.rss_bytes()?));
        }
        worker.send("stop").await?;
        let _: SlotRecords = worker.finish(STEP_TIMEOUT).await?;
        Ok(points)
    }
}

/// The latency figures at the fewest waiters on one transport.
#[derive(Debug)]
pub(crate) struct LatencyFigures {
    /// The echo server's round trips.
    pub(crate) wire: TransportBaselines,
    /// The broker's uncontended acquire and cycle.
    pub(crate) uncontended: Uncontended,
    /// Handoffs through the bare semaphore.
    pub(crate) semaphore: HandoffPoint,
    /// Handoffs through the broker.
    pub(crate) handoff: HandoffPoint,
}

/// What one contention run measured.
#[derive(Debug)]
struct Contention {
    grants_per_s: f64,
    cpu_us_per_grant: f64,
    errors: u64,
}

/// The raw results of one or more rotations.
#[derive(Debug, Default)]
struct Rotation {
    handoffs: Vec<u64>,
    status: Vec<u64>,
    same_process: usize,
    errors: u64,
    /// The server's CPU time over the rotations, and the grants it made.
    cpu_ns: u64,
    grants: u64,
    /// Position updates the slots received.
    updates: u64,
}

impl Rotation {
    fn absorb(&mut self, other: Self) {
        self.handoffs.extend(other.handoffs);
        self.status.extend(other.status);
        self.same_process += other.same_process;
        self.errors += other.errors;
        self.cpu_ns += other.cpu_ns;
        self.grants += other.grants;
        self.updates += other.updates;
    }

    fn point(self, transport: Transport, others: usize) -> Result<HandoffPoint> {
        Ok(HandoffPoint {
            transport,
            other_waiters: others,
            handoff: summary(&self.handoffs, "handoffs")?,
            status: Summary::of_ns(&self.status),
            same_process_skipped: self.same_process,
            errors: self.errors,
            server_cpu_us_per_grant: self.cpu_ns as f64 / 1_000.0 / self.grants.max(1) as f64,
            updates_per_grant: self.updates as f64 / self.grants.max(1) as f64,
        })
    }
}

fn absorb(pool: &mut Latencies, round: Latencies) {
    pool.first.extend(round.first);
    pool.second.extend(round.second);
}

fn summary(samples: &[u64], what: &str) -> Result<Summary> {
    Summary::of_ns(samples).with_context(|| format!("no {what} were measured"))
}

/// The fencing token of the lease held now: the newest holder's, or, for
/// a server that lists no holders (the bare semaphore), its grant count.
async fn current_token(address: &str) -> Result<u64> {
    let mut client = connect(address).await?;
    let status = client
        .status(pb::StatusRequest::default())
        .await?
        .into_inner();
    Ok(status
        .holders
        .iter()
        .map(|holder| holder.fencing_token)
        .max()
        .unwrap_or(status.total_grants))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Handoff latencies from the records of the rotating processes: for every
/// token `k + 1` in `first + 1 ..= last`, the grant of `k + 1` minus the
/// release of `k`, when the two happened in different processes (with
/// capacity 1, grant `k + 1` can only follow the end of lease `k`). Returns
/// the samples in token order and the number of handoffs that stayed in
/// one process.
pub(crate) fn join_handoffs(
    processes: &[Vec<SlotRecord>],
    first: u64,
    last: u64,
) -> (Vec<u64>, usize) {
    let mut by_token = HashMap::new();
    for (process, records) in processes.iter().enumerate() {
        for record in records {
            by_token.insert(record.token, (process, *record));
        }
    }
    let mut samples = Vec::new();
    let mut same_process = 0;
    for token in first..last {
        let (Some((from, released)), Some((to, granted))) =
            (by_token.get(&token), by_token.get(&(token + 1)))
        else {
            continue;
        };
        let Some(released_ns) = released.released_ns else {
            continue;
        };
        if from == to {
            same_process += 1;
            continue;
        }
        samples.push(granted.granted_ns.saturating_sub(released_ns));
    }
    (samples, same_process)
}

/// Lock handoffs between processes: each time one process gave the lock
/// back and, next of all events, another process took it.
pub(crate) fn join_lock_handoffs(processes: &[Vec<LockEvent>]) -> Vec<u64> {
    let mut events: Vec<(u64, usize, bool)> = processes
        .iter()
        .enumerate()
        .flat_map(|(process, events)| events.iter().map(move |e| (e.at_ns, process, e.taken)))
        .collect();
    events.sort_unstable();
    events
        .windows(2)
        .filter_map(|pair| {
            let ((given_at, from, taken_before), (taken_at, to, taken)) = (pair[0], pair[1]);
            (!taken_before && taken && from != to).then(|| taken_at - given_at)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(token: u64, granted_ns: u64, released_ns: Option<u64>) -> SlotRecord {
        SlotRecord {
            token,
            granted_ns,
            released_ns,
        }
    }

    #[test]
    fn handoffs_join_release_of_k_to_grant_of_k_plus_1() {
        let x = vec![record(1, 0, Some(100)), record(3, 400, Some(500))];
        let y = vec![record(2, 130, Some(300)), record(4, 520, None)];
        assert_eq!(join_handoffs(&[x, y], 1, 4), (vec![30, 100, 20], 0));
    }

    #[test]
    fn same_process_handoffs_are_skipped() {
        let x = vec![record(1, 0, Some(100)), record(2, 150, Some(200))];
        let y = vec![record(3, 260, None)];
        assert_eq!(join_handoffs(&[x, y], 1, 3), (vec![60], 1));
    }

    #[test]
    fn lock_handoffs_cross_processes_only() {
        let event = |taken, at_ns| LockEvent { taken, at_ns };
        let a = vec![
            event(true, 0),
            event(false, 100),
            event(true, 300),
            event(false, 400),
        ];
        let b = vec![event(true, 105), event(false, 200)];
        // a gives at 100, b takes at 105; b gives at 200, a takes at 300;
        // a gives at 400 and nobody takes it.
        assert_eq!(join_lock_handoffs(&[a, b]), vec![5, 100]);
    }
}
