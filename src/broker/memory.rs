//! Keeping the core's view of GPU memory current, and carrying out its
//! unload decisions.
//!
//! A poller reads every GPU's memory from the inventory on a blocking
//! thread, every `gpu.poll_interval` (every 100 ms while a request waits for
//! memory, and at once when one starts to), and feeds the readings to the
//! core outside of any lock held during the reading. Unload requests go to
//! the consumer's adapter: a command the broker runs, or the consumer's open
//! `Residency` stream.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use super::Broker;
use crate::config::UnloadMethod;
use crate::core::UnloadRequest;

/// How often memory is read while a request waits for it.
const FAST_POLL: Duration = Duration::from_millis(100);

/// Each consumer's open `Residency` streams, by listener id.
type Streams = HashMap<String, Vec<(u64, mpsc::Sender<UnloadRequest>)>>;

/// The open `Residency` streams, by consumer.
#[derive(Debug, Default)]
pub(super) struct Listeners {
    streams: Mutex<Streams>,
    /// Unload requests that found no open stream, by consumer: handed to
    /// the consumer's next stream, so that one that reconnects a moment too
    /// late still hears it.
    undelivered: Mutex<HashMap<String, Vec<UnloadRequest>>>,
    /// The GPUs each consumer was asked to unload from and has not answered
    /// for: an `unloaded` is believed only as the answer to one of these.
    asked: Mutex<HashMap<String, BTreeSet<u32>>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// A consumer's open `Residency` stream. Dropping it unregisters it.
#[derive(Debug)]
pub(crate) struct ResidencyListener {
    broker: Arc<Broker>,
    consumer: String,
    id: u64,
    requests: mpsc::Receiver<UnloadRequest>,
}

impl ResidencyListener {
    /// The next unload request for this consumer. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Option<UnloadRequest> {
        self.requests.recv().await
    }

    /// The consumer says it freed its memory on `gpu_index` (all with
    /// `None`). Believed only as the answer to an unload request: anyone who
    /// may open a Residency stream as this consumer could claim it, and a
    /// false claim would make the broker grant memory that is still in use.
    /// With NVML even the answer only triggers a reading, which decides.
    /// Returns whether it answered a request.
    pub(crate) fn unloaded(&self, gpu_index: Option<u32>) -> bool {
        let answered = {
            let mut asked = lock(&self.broker.residency.asked);
            let answered = asked
                .get_mut(&self.consumer)
                .is_some_and(|gpus| match gpu_index {
                    Some(index) => gpus.remove(&index),
                    None => !std::mem::take(gpus).is_empty(),
                });
            if asked.get(&self.consumer).is_some_and(BTreeSet::is_empty) {
                asked.remove(&self.consumer);
            }
            answered
        };
        if !answered {
            warn!(consumer = %self.consumer, gpu = ?gpu_index,
                "ignoring an `unloaded` that answers no unload request");
            return false;
        }
        if self.broker.inventory.source() == "nvml" {
            info!(consumer = %self.consumer, gpu = ?gpu_index,
                "consumer reports it unloaded; reading the GPU's memory to see");
            self.broker.poll_now.notify_one();
        } else {
            self.broker.unloaded(&self.consumer, gpu_index);
        }
        true
    }
}

impl Drop for ResidencyListener {
    fn drop(&mut self) {
        let mut streams = lock(&self.broker.residency.streams);
        if let Some(list) = streams.get_mut(&self.consumer) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                streams.remove(&self.consumer);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Broker {
    /// Registers a `Residency` stream for `consumer`.
    pub(crate) fn listen_for_unloads(self: &Arc<Self>, consumer: String) -> ResidencyListener {
        let (tx, rx) = mpsc::channel(8);
        let id = self
            .residency
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut streams = lock(&self.residency.streams);
        let undelivered = lock(&self.residency.undelivered).remove(&consumer);
        for request in undelivered.into_iter().flatten() {
            info!(consumer = %request.consumer, "handing an earlier unload request to the new Residency stream");
            let _ = tx.try_send(request);
        }
        streams.entry(consumer.clone()).or_default().push((id, tx));
        drop(streams);
        ResidencyListener {
            broker: Arc::clone(self),
            consumer,
            id,
            requests: rx,
        }
    }

    /// A consumer freed its memory on `gpu_index` (all with `None`).
    pub(crate) fn unloaded(&self, consumer: &str, gpu_index: Option<u32>) {
        info!(%consumer, gpu = ?gpu_index, "consumer reports it unloaded");
        let consumer = consumer.to_owned();
        self.update(move |sched, now| {
            sched.unloaded(&consumer, gpu_index, now);
        });
        self.poll_now.notify_one();
    }

    /// Carries out unload requests, without waiting for them.
    pub(super) fn dispatch(self: &Broker, unloads: Vec<UnloadRequest>) {
        for request in unloads {
            let method = self.live().unload.get(&request.consumer).cloned();
            info!(
                consumer = %request.consumer,
                gpu = request.gpu_index,
                footprint_mib = request.footprint_mib,
                for_consumer = %request.for_consumer,
                method = method.as_ref().map_or("none", UnloadMethod::name),
                "asking an idle resident to unload"
            );
            if method.is_some() {
                self.unload_sent(&request);
            }
            match method {
                Some(UnloadMethod::Command(argv)) => self.run_unload_command(argv, request),
                Some(UnloadMethod::Stream) => self.send_unload_request(request),
                None => {}
            }
        }
    }

    fn send_unload_request(&self, request: UnloadRequest) {
        lock(&self.residency.asked)
            .entry(request.consumer.clone())
            .or_default()
            .insert(request.gpu_index);
        let streams = lock(&self.residency.streams);
        let sent = streams.get(&request.consumer).is_some_and(|list| {
            list.iter()
                .filter(|(_, tx)| tx.try_send(request.clone()).is_ok())
                .count()
                > 0
        });
        if !sent {
            warn!(
                consumer = %request.consumer,
                "no Residency stream is open for this consumer; it will be asked when one opens"
            );
            let mut undelivered = lock(&self.residency.undelivered);
            let waiting = undelivered.entry(request.consumer.clone()).or_default();
            // One outstanding request per GPU is enough.
            waiting.retain(|r| r.gpu_index != request.gpu_index);
            waiting.push(request);
        }
    }

    fn run_unload_command(&self, argv: Vec<String>, request: UnloadRequest) {
        let uuid = self
            .inventory
            .gpus()
            .into_iter()
            .find(|g| g.index == request.gpu_index)
            .map(|g| g.uuid)
            .unwrap_or_default();
        let measured = self.inventory.source() == "nvml";
        let timeout = self.unload_timeout();
        // The command runs on its own; only a weak handle keeps the broker.
        let broker = self.this.clone();
        tokio::spawn(async move {
            let mut command = Command::new(&argv[0]);
            command
                .args(&argv[1..])
                .env("GPULEASE_CONSUMER", &request.consumer)
                .env("GPULEASE_GPU_INDEX", request.gpu_index.to_string())
                .env("GPULEASE_GPU_UUID", &uuid)
                .stdin(std::process::Stdio::null())
                // The service manager's variables are the broker's, not its
                // adapters'.
                .env_remove("NOTIFY_SOCKET")
                .env_remove("WATCHDOG_USEC")
                .env_remove("WATCHDOG_PID")
                .kill_on_drop(true);
            let outcome = tokio::time::timeout(timeout, command.status()).await;
            let succeeded = matches!(&outcome, Ok(Ok(status)) if status.success());
            match outcome {
                Ok(Ok(status)) if status.success() => {
                    info!(consumer = %request.consumer, "unload command succeeded");
                    let Some(broker) = broker.upgrade() else {
                        return;
                    };
                    if measured {
                        // Success says the unload was asked for, not that
                        // the memory is free (ComfyUI answers at once):
                        // read the memory to see.
                        broker.poll_now.notify_one();
                    } else {
                        // Without readings, the command's word is all there is.
                        broker.unloaded(&request.consumer, Some(request.gpu_index));
                    }
                }
                Ok(Ok(status)) => {
                    warn!(consumer = %request.consumer, %status, "unload command failed");
                }
                Ok(Err(e)) => {
                    warn!(consumer = %request.consumer, error = %e, program = %argv[0], "cannot run the unload command");
                }
                Err(_) => {
                    warn!(consumer = %request.consumer, "unload command did not finish in time; killed");
                }
            }
            if !succeeded && let Some(broker) = broker.upgrade() {
                broker.unload_failed(&request);
            }
        });
    }

    /// Reads GPU memory until shutdown, feeds it to the core, and wakes the
    /// core at its deadlines (unload timeouts, idle TTLs).
    pub(super) async fn poll_memory(self: Arc<Self>) {
        let broker = self;
        let measured = broker.inventory.source() == "nvml";
        let gpus: Vec<u32> = broker.inventory.gpus().iter().map(|g| g.index).collect();
        let shutdown = broker.shutdown.clone();
        loop {
            if measured {
                let inventory = Arc::clone(&broker.inventory);
                let matchers = Arc::clone(&broker.live().matchers);
                let indices = gpus.clone();
                // Stamp readings with when they were taken, not when they
                // arrive: a reading from before a holder vanished must not
                // count as proof that its processes left.
                let taken = Instant::now().into_std();
                let readings = tokio::task::spawn_blocking(move || {
                    // The `match` rules read /proc: here, not under the lock.
                    indices
                        .into_iter()
                        .map(|index| {
                            let reading = inventory.read(index).map(|reading| {
                                reading.map(|r| {
                                    let matched = matchers.tag(&r);
                                    (r, matched)
                                })
                            });
                            (index, reading)
                        })
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
                let mut failed = Vec::new();
                broker.update(|sched, now| {
                    for (index, reading) in readings {
                        match reading {
                            Ok(Some((reading, matched))) => {
                                sched.observe_matched(index, reading, matched, taken);
                            }
                            Ok(None) => {}
                            Err(e) => failed.push((index, e)),
                        }
                    }
                    sched.expire_residents(now);
                });
                // Logged once the core's lock is released, as every line is.
                for (index, e) in failed {
                    warn!(gpu = index, error = %e, "cannot read GPU memory");
                }
            } else {
                broker.update(|sched, now| sched.expire_residents(now));
            }
            broker.settle_unloads();
            let (fast, deadline) = {
                let state = broker.lock();
                (
                    state.sched.awaiting_memory(),
                    state.sched.next_deadline(Instant::now().into_std()),
                )
            };
            let poll_interval = broker.live().poll_interval;
            let interval = if fast {
                FAST_POLL.min(poll_interval)
            } else {
                poll_interval
            };
            let mut wake = Instant::now() + interval;
            if let Some(deadline) = deadline {
                let deadline = Instant::from_std(deadline);
                wake = wake.min(deadline.max(Instant::now()));
            }
            // A change that brings a deadline before this wakes the poller
            // early (see `Broker::settle`).
            broker.lock().poller_wakes_at = Some(wake.into_std());
            let poll_now = async { broker.poll_now.notified().await };
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = poll_now => {}
                () = shutdown.cancelled() => return,
            }
        }
    }
}
