//! One service of the sharing benchmark, in its own process (the hidden
//! `worker` mode): it takes jobs from the orchestrator, leases the card as
//! its policy says, loads, keeps and unloads its model, and allocates its
//! job memory, all under its own PID.
//!
//! It owns no memory itself: every load, allocation and free is a line to
//! the simulator (in the orchestrator), which owns the card's truth, may
//! answer `oom`, and writes the fake NVML state the broker reads. Every
//! line starts with the time on the shared `CLOCK_MONOTONIC` and waits for
//! the simulator's `ok` (or `oom`), so that the simulator sees each
//! process's steps in order and at the moment they happen:
//!
//! | line | meaning |
//! |---|---|
//! | `acquire ID` | the job asks for the card (the broker's call is opened next) |
//! | `granted ID TOKEN` | the lease is granted, with its fencing token (without a broker: the job's turn came; token 0) |
//! | `load ID MIB` | allocate the model; `oom` fails the job |
//! | `loaded ID` | the model is ready, after the load time |
//! | `alloc ID MIB` | allocate the job's memory; `oom` fails the job |
//! | `start ID` / `done ID MIB` | the job computes; at the end it frees MIB |
//! | `failed ID` | the job failed on an `oom` and gave back what it had |
//! | `release ID` | the lease is given back (told just before the broker hears it) |
//! | `asked FOR` | the broker asked it to unload for consumer FOR |
//! | `unload FOR MIB` | it frees its model (FOR is `-` when nobody asked) |
//! | `preempted ID DONE_MS` | asked to give the card back mid-job: it frees its job memory, keeps DONE_MS of work, and queues the rest |
//!
//! The orchestrator writes `job ID WORK_MS` when a job arrives, `stop` at
//! the end, and the simulator's answers.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use gpulease_client::pb::v1 as pb;
use gpulease_client::pb::v1::lease_event::Kind as EventKind;
use gpulease_client::pb::v1::lease_request::Kind as RequestKind;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;

use super::Policy;
use super::trace::Service;
use crate::calls::{Client, connect};
use gpulease_testkit::clock::now_ns;

/// How long the broker may take to end a stream after `Release`.
const END_TIMEOUT: Duration = Duration::from_secs(5);

/// What one consumer process is.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ConsumerSpec {
    /// The service it plays.
    pub(crate) service: Service,
    /// How it shares the card.
    pub(crate) policy: Policy,
    /// The broker's address, for the policies that have one.
    pub(crate) broker: Option<String>,
    /// How long loading its model takes, in wall milliseconds.
    pub(crate) load_ms: u64,
}

/// Runs the consumer until `stop` or the end of standard input.
pub(crate) async fn run(spec: ConsumerSpec) -> Result<String> {
    let (jobs_tx, mut jobs) = mpsc::unbounded_channel::<(usize, u64)>();
    let (replies_tx, replies) = mpsc::unbounded_channel::<bool>();
    let stop = CancellationToken::new();
    let reader_stop = stop.clone();
    // Standard input blocks: a plain thread reads it.
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            let mut words = line.split_whitespace();
            match words.next() {
                Some("ok") => drop(replies_tx.send(true)),
                Some("oom") => drop(replies_tx.send(false)),
                Some("job") => {
                    let id = words.next().and_then(|w| w.parse().ok());
                    let work = words.next().and_then(|w| w.parse().ok());
                    if let (Some(id), Some(work)) = (id, work) {
                        let _ = jobs_tx.send((id, work));
                    }
                }
                _ => break,
            }
        }
        reader_stop.cancel();
    });
    let sim = Arc::new(Sim(Mutex::new(replies)));
    let client = match &spec.broker {
        Some(address) => Some(connect(address).await?),
        None => None,
    };
    let state = Arc::new(Mutex::new(State::default()));
    if spec.policy == Policy::Gpulease && spec.service.unloads_on_request {
        let client = client.clone().context("no broker")?;
        let residency = residency(
            client,
            spec.service.clone(),
            Arc::clone(&sim),
            Arc::clone(&state),
        );
        let stop = stop.clone();
        tokio::spawn(async move {
            if let Some(Err(e)) = stop.run_until_cancelled(residency).await {
                eprintln!("gpulease-bench consumer: the Residency stream failed: {e:#}");
            }
        });
    }
    println!("ready");
    let consumer = Consumer {
        spec,
        client,
        sim,
        state,
    };
    // Jobs that arrived, and the rest of preempted ones (first).
    let mut queue: VecDeque<(usize, u64)> = VecDeque::new();
    let work = async {
        loop {
            while let Ok(job) = jobs.try_recv() {
                queue.push_back(job);
            }
            let job = match queue.pop_front() {
                Some(job) => job,
                None => match jobs.recv().await {
                    Some(job) => job,
                    None => return Ok(()),
                },
            };
            if let Some(rest) = consumer.job(job.0, job.1).await? {
                queue.push_front((job.0, rest));
            }
        }
    };
    match stop.run_until_cancelled(work).await {
        Some(Err(e)) if !stop.is_cancelled() => Err(e),
        _ => Ok(String::new()),
    }
}

/// The line to the simulator, one question and answer at a time.
struct Sim(Mutex<mpsc::UnboundedReceiver<bool>>);

impl Sim {
    /// Tells the simulator `what` and returns its answer: `false` for `oom`.
    async fn tell(&self, what: &str) -> Result<bool> {
        let mut replies = self.0.lock().await;
        {
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{} {what}", now_ns())?;
            stdout.flush()?;
        }
        replies.recv().await.context("the simulator has gone")
    }
}

/// What the job loop and the `Residency` task share.
#[derive(Default)]
struct State {
    /// The model is on the card.
    loaded: bool,
    /// A lease is held (or, without a broker, a job runs).
    holding: bool,
    /// An unload asked for while holding, done at the lease's end: for
    /// whom, and the GPU to report.
    deferred: Option<(String, u32)>,
    /// Where to report `unloaded`.
    reports: Option<mpsc::Sender<pb::ResidencyReport>>,
}

struct Consumer {
    spec: ConsumerSpec,
    client: Option<Client>,
    sim: Arc<Sim>,
    state: Arc<Mutex<State>>,
}

impl Consumer {
    /// Runs job `id` with `work_ms` of work; returns the work left if it
    /// was preempted.
    async fn job(&self, id: usize, work_ms: u64) -> Result<Option<u64>> {
        let service = &self.spec.service;
        self.sim.tell(&format!("acquire {id}")).await?;
        let mut lease = match (&self.client, self.spec.policy) {
            (Some(client), policy) if policy != Policy::NoBroker => {
                let acquire = pb::Acquire {
                    consumer: service.name.clone(),
                    // Only gpulease is told the memory; a lock is not.
                    vram_mib: if policy == Policy::Gpulease {
                        service.need_mib()
                    } else {
                        0
                    },
                    client_pid: std::process::id(),
                    ..Default::default()
                };
                Some(Lease::acquire(client, acquire).await?)
            }
            _ => None,
        };
        let token = lease.as_ref().map_or(0, |lease| lease.token);
        self.sim.tell(&format!("granted {id} {token}")).await?;
        self.state.lock().await.holding = true;
        let outcome = self.hold(id, work_ms, lease.as_mut()).await;
        // Told before the broker hears it: the next grant may follow the
        // `Release` at once, and must not find this lease still held.
        self.sim.tell(&format!("release {id}")).await?;
        if let Some(lease) = lease {
            lease.release().await?;
        }
        let mut state = self.state.lock().await;
        state.holding = false;
        if let Some((for_consumer, gpu)) = state.deferred.take() {
            self.unload(&mut state, &for_consumer).await?;
            if let Some(reports) = &state.reports {
                let _ = reports.send(unloaded(gpu)).await;
            }
        }
        outcome
    }

    /// The part of a job under the lease: load if needed, allocate, work,
    /// free.
    async fn hold(
        &self,
        id: usize,
        work_ms: u64,
        lease: Option<&mut Lease>,
    ) -> Result<Option<u64>> {
        let service = &self.spec.service;
        if service.model_mib > 0 && !self.state.lock().await.loaded {
            if !self
                .sim
                .tell(&format!("load {id} {}", service.model_mib))
                .await?
            {
                self.sim.tell(&format!("failed {id}")).await?;
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(self.spec.load_ms)).await;
            self.state.lock().await.loaded = true;
            self.sim.tell(&format!("loaded {id}")).await?;
        }
        if service.job_mib > 0
            && !self
                .sim
                .tell(&format!("alloc {id} {}", service.job_mib))
                .await?
        {
            self.sim.tell(&format!("failed {id}")).await?;
            return Ok(None);
        }
        self.sim.tell(&format!("start {id}")).await?;
        let started = now_ns();
        let preempted = match lease {
            Some(lease) => {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(work_ms)) => false,
                    true = lease.preempt_requested() => true,
                }
            }
            None => {
                tokio::time::sleep(Duration::from_millis(work_ms)).await;
                false
            }
        };
        if preempted {
            // A checkpoint keeps the work done; the rest waits for the
            // next lease.
            let done_ms = (now_ns() - started) / 1_000_000;
            self.sim
                .tell(&format!("preempted {id} {done_ms} {}", service.job_mib))
                .await?;
            return Ok(Some(work_ms.saturating_sub(done_ms).max(1)));
        }
        self.sim
            .tell(&format!("done {id} {}", service.job_mib))
            .await?;
        if self.spec.policy == Policy::GlobalLockUnload && service.model_mib > 0 {
            let mut state = self.state.lock().await;
            self.unload(&mut state, "-").await?;
        }
        Ok(None)
    }

    /// Frees the model, if it is loaded.
    async fn unload(&self, state: &mut State, for_consumer: &str) -> Result<()> {
        if state.loaded {
            self.sim
                .tell(&format!(
                    "unload {for_consumer} {}",
                    self.spec.service.model_mib
                ))
                .await?;
            state.loaded = false;
        }
        Ok(())
    }
}

fn unloaded(gpu_index: u32) -> pb::ResidencyReport {
    pb::ResidencyReport {
        kind: Some(pb::residency_report::Kind::Unloaded(pb::Unloaded {
            gpu_index,
            all_gpus: false,
        })),
    }
}

/// Listens on a `Residency` stream and unloads when asked: at once when
/// idle, at the end of its lease when holding.
async fn residency(
    client: Client,
    service: Service,
    sim: Arc<Sim>,
    state: Arc<Mutex<State>>,
) -> Result<()> {
    let (reports, outbound) = mpsc::channel(8);
    reports
        .send(pb::ResidencyReport {
            kind: Some(pb::residency_report::Kind::Hello(pb::ResidencyHello {
                consumer: service.name.clone(),
            })),
        })
        .await?;
    state.lock().await.reports = Some(reports.clone());
    let mut commands = client
        .clone()
        .residency(ReceiverStream::new(outbound))
        .await
        .context("Residency failed")?
        .into_inner();
    while let Some(command) = commands.message().await? {
        let Some(pb::residency_command::Kind::UnloadRequested(asked)) = command.kind else {
            continue;
        };
        let for_consumer = if asked.for_consumer.is_empty() {
            "-".to_owned()
        } else {
            asked.for_consumer.clone()
        };
        sim.tell(&format!("asked {for_consumer}")).await?;
        let mut state = state.lock().await;
        if state.holding {
            state.deferred = Some((for_consumer, asked.gpu_index));
            continue;
        }
        if state.loaded {
            sim.tell(&format!("unload {for_consumer} {}", service.model_mib))
                .await?;
            state.loaded = false;
        }
        drop(state);
        reports.send(unloaded(asked.gpu_index)).await?;
    }
    Ok(())
}

/// A granted lease on an open `AcquireLease` call.
struct Lease {
    requests: mpsc::Sender<pb::LeaseRequest>,
    events: Streaming<pb::LeaseEvent>,
    /// Its fencing token, to find it in the broker's log.
    token: u64,
}

impl Lease {
    /// Opens the call and waits for the grant, skipping position updates.
    /// The orchestrator's `stop` bounds the wait.
    async fn acquire(client: &Client, acquire: pb::Acquire) -> Result<Self> {
        let (requests, outbound) = mpsc::channel(4);
        requests
            .send(pb::LeaseRequest {
                kind: Some(RequestKind::Acquire(acquire)),
            })
            .await?;
        let mut events = client
            .clone()
            .acquire_lease(ReceiverStream::new(outbound))
            .await
            .context("AcquireLease failed")?
            .into_inner();
        loop {
            let event = events
                .message()
                .await
                .context("the AcquireLease stream failed")?
                .context("the AcquireLease stream ended before a grant")?;
            match event.kind {
                Some(EventKind::Granted(granted)) => {
                    return Ok(Self {
                        requests,
                        events,
                        token: granted.fencing_token,
                    });
                }
                Some(EventKind::Queued(_)) => {}
                other => bail!("unexpected event before the grant: {other:?}"),
            }
        }
    }

    /// Waits until the broker asks for the card back; pends forever if it
    /// never does. If the stream ends first (a revoke), the job still runs
    /// to its end: the simulator, not the lease, decides what fits.
    async fn preempt_requested(&mut self) -> bool {
        loop {
            match self.events.message().await {
                Ok(Some(event)) if is_preempt_request(&event) => return true,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => std::future::pending::<()>().await,
            }
        }
    }

    /// Sends `Release`, half-closes, and waits for the stream's end.
    async fn release(self) -> Result<()> {
        let _ = self
            .requests
            .send(pb::LeaseRequest {
                kind: Some(RequestKind::Release(pb::Release {})),
            })
            .await;
        drop(self.requests);
        let mut events = self.events;
        let end = async { while let Ok(Some(_)) = events.message().await {} };
        tokio::time::timeout(END_TIMEOUT, end)
            .await
            .context("the lease stream did not end after Release")
    }
}

/// Whether `event` asks the holder to give the card back.
fn is_preempt_request(event: &pb::LeaseEvent) -> bool {
    matches!(event.kind, Some(EventKind::PreemptRequested(_)))
}
