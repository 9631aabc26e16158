//! Taking a lease: [`LeaseBuilder`] fills in the `Acquire` request, and the
//! [`Lease`] guard holds what the broker granted until it is released or
//! dropped.
//!
//! One `AcquireLease` call is one lease. While the request waits, the
//! builder's `on_queued` callback sees every `Queued` update. Once granted, a
//! task of the lease reads the rest of the call: it runs the
//! `on_preempt_requested` callback when the broker asks the holder to make
//! way, and records why the lease ended if the broker ends it, which
//! [`Lease::lost`] reports. The owner ends the lease by sending `Release`,
//! from [`Lease::release`] or from `Drop`: a polite end, so the broker hands
//! the GPU on at once instead of waiting out a lost holder's lock-delay.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::connect::{Client, GrpcClient};
use crate::error::{Error, Lost};
use crate::pb::v1 as pb;
use crate::pb::v1::lease_event::Kind as EventKind;
use crate::pb::v1::lease_request::Kind as RequestKind;

/// How long an ended call may take to be confirmed by the broker after its
/// owner has gone, before the connection's stream is reset instead.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

type QueuedCallback = Box<dyn FnMut(&pb::Queued) + Send>;
type PreemptCallback = Box<dyn FnMut(&pb::PreemptRequested) + Send>;

/// A lease request being put together; [`LeaseBuilder::acquire`] sends it.
///
/// Made by [`Client::lease`]. Every field of the proto's `Acquire` has a
/// method; what is not set keeps the proto's default.
#[must_use = "a lease is asked for only by `acquire()`"]
pub struct LeaseBuilder {
    grpc: GrpcClient,
    acquire: pb::Acquire,
    max_wait: Option<Duration>,
    on_queued: Option<QueuedCallback>,
    on_preempt: Option<PreemptCallback>,
}

/// A held lease. It ends when it is dropped (or [`Lease::release`]d); until
/// then the GPU is this holder's, as far as the broker's queue goes.
///
/// Dropping it sends `Release` and lets a task of the lease wait (up to 2 s)
/// for the broker to end the call, so that the release is a polite one even
/// though `Drop` cannot wait. Without a Tokio runtime to run on (after it
/// shut down) the call is simply cut, which the broker treats as a lost
/// holder.
#[derive(Debug)]
pub struct Lease {
    granted: pb::Granted,
    /// The request stream, until `Release` has been sent on it.
    requests: Option<mpsc::Sender<pb::LeaseRequest>>,
    /// Set by the lease's task once the call has ended, and why.
    ended: watch::Receiver<Option<Lost>>,
}

impl Client {
    /// Starts a lease request for `consumer` (1 to 64 characters of
    /// `[A-Za-z0-9._-]`); nothing is sent until
    /// [`acquire`](LeaseBuilder::acquire).
    pub fn lease(&self, consumer: impl Into<String>) -> LeaseBuilder {
        LeaseBuilder {
            grpc: self.grpc.clone(),
            acquire: pb::Acquire {
                consumer: consumer.into(),
                ..pb::Acquire::default()
            },
            max_wait: None,
            on_queued: None,
            on_preempt: None,
        }
    }
}

impl LeaseBuilder {
    /// The GPU memory the work needs, in MiB (`Acquire.vram_mib`). Default:
    /// 0, unknown (the consumer's configured size, if any, applies).
    pub fn vram_mib(mut self, mib: u64) -> Self {
        self.acquire.vram_mib = mib;
        self
    }

    /// Gives up if the lease is not granted within `wait`
    /// (`Acquire.max_wait_ms`): `acquire()` then fails with
    /// [`Error::Status`] `DEADLINE_EXCEEDED`. Default: wait forever. At most
    /// 49 days; a zero `wait` gives up at once unless the lease is free.
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = Some(wait);
        self
    }

    /// Which GPU (`Acquire.gpu`): its index (`0` or `"0"`) or UUID
    /// (`"GPU-…"`). Default: whichever GPU can take the request soonest.
    pub fn gpu(mut self, gpu: impl ToString) -> Self {
        self.acquire.gpu = gpu.to_string();
        self
    }

    /// A priority for this request (`Acquire.priority`): it may lower the
    /// request below its consumer's configured priority, never raise it.
    /// Default: the consumer's priority.
    pub fn priority(mut self, priority: i32) -> Self {
        self.acquire.priority = Some(priority);
        self
    }

    /// The process whose GPU memory this lease's is (`Acquire.client_pid`),
    /// a hint the broker checks. Default: 0, the caller itself.
    pub fn client_pid(mut self, pid: u32) -> Self {
        self.acquire.client_pid = pid;
        self
    }

    /// Adds a label shown in the broker's status (`Acquire.labels`), for
    /// example a job id; a second value for the same key replaces the first.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.acquire.labels.insert(key.into(), value.into());
        self
    }

    /// Adds several labels, as [`LeaseBuilder::label`] does.
    pub fn labels<K, V>(mut self, labels: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        let labels: HashMap<String, String> = labels
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        self.acquire.labels.extend(labels);
        self
    }

    /// Calls `queued` with every `Queued` update while the request waits:
    /// once at once, and again whenever its position improves. It runs on
    /// the task that awaits `acquire()`, between reads of the call, so it
    /// should return quickly.
    pub fn on_queued(mut self, queued: impl FnMut(&pb::Queued) + Send + 'static) -> Self {
        self.on_queued = Some(Box::new(queued));
        self
    }

    /// Calls `asked` when the broker asks the holder of this (preemptible)
    /// lease to make way for a waiter of higher priority
    /// (`preempt_requested {grace_ms, for_consumer}`): release within
    /// `grace_ms`, or the lease is revoked and [`Lease::lost`] says so. It
    /// runs on the lease's own task, so it should return quickly (send on a
    /// channel, signal a process).
    pub fn on_preempt_requested(
        mut self,
        asked: impl FnMut(&pb::PreemptRequested) + Send + 'static,
    ) -> Self {
        self.on_preempt = Some(Box::new(asked));
        self
    }

    /// The request as it will be sent (`max_wait` aside).
    pub fn request(&self) -> &pb::Acquire {
        &self.acquire
    }

    /// Asks for the lease and waits in the broker's queue until it is
    /// granted.
    ///
    /// Fails with [`Error::Status`] when the broker refuses the request or
    /// `max_wait` passes, [`Error::Revoked`] when the broker revokes the
    /// request before the grant (it is shutting down), and
    /// [`Error::InvalidRequest`] for a `max_wait` too long to send.
    ///
    /// Cancelling it (dropping the future) withdraws the request: `Release`
    /// is sent, and the broker takes the request out of its queue, or, if
    /// the grant crossed the release, ends that lease at once as released.
    pub async fn acquire(self) -> Result<Lease, Error> {
        let Self {
            mut grpc,
            mut acquire,
            max_wait,
            mut on_queued,
            on_preempt,
        } = self;
        if let Some(wait) = max_wait {
            acquire.max_wait_ms = u32::try_from(wait.as_millis().max(1)).map_err(|_| {
                Error::InvalidRequest("max_wait is too long: at most 49 days".into())
            })?;
        }
        // Room for both messages a call ever sends: `Acquire` now, and one
        // `Release` later, so that neither send has to wait.
        let (requests, outgoing) = mpsc::channel(2);
        let _ = requests.try_send(request(RequestKind::Acquire(acquire)));
        let events = grpc
            .acquire_lease(ReceiverStream::new(outgoing))
            .await?
            .into_inner();
        let mut pending = Pending(Some(Call {
            requests,
            events,
            grpc,
        }));
        while let Some(call) = pending.0.as_mut() {
            match call.events.message().await?.and_then(|e| e.kind) {
                Some(EventKind::Queued(queued)) => {
                    if let Some(queued_callback) = on_queued.as_mut() {
                        queued_callback(&queued);
                    }
                }
                Some(EventKind::Granted(granted)) => {
                    if let Some(call) = pending.0.take() {
                        return Ok(Lease::hold(call, granted, on_preempt));
                    }
                }
                // Only a holder is asked to make way.
                Some(EventKind::PreemptRequested(_)) => {}
                Some(EventKind::Revoked(revoked)) => {
                    return Err(Error::Revoked {
                        reason: revoked.reason(),
                        message: revoked.message,
                    });
                }
                None => break,
            }
        }
        Err(Error::Ended)
    }
}

impl fmt::Debug for LeaseBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseBuilder")
            .field("acquire", &self.acquire)
            .field("max_wait", &self.max_wait)
            .field("on_queued", &self.on_queued.is_some())
            .field("on_preempt_requested", &self.on_preempt.is_some())
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// The fencing token (`Granted.fencing_token`): strictly increasing over
    /// the broker's grants, for a resource that refuses writes from older
    /// holders.
    pub fn token(&self) -> u64 {
        self.granted.fencing_token
    }

    /// The lease's unique name (`Granted.lease_id`), as logs and status show
    /// it.
    pub fn lease_id(&self) -> &str {
        &self.granted.lease_id
    }

    /// The broker's epoch (`Granted.broker_epoch`): with the token, it names
    /// this grant uniquely across restarts of the broker.
    pub fn broker_epoch(&self) -> u64 {
        self.granted.broker_epoch
    }

    /// The index of the granted GPU.
    pub fn gpu(&self) -> u32 {
        self.granted.gpu_index
    }

    /// The UUID of the granted GPU, when the broker knows it.
    pub fn gpu_uuid(&self) -> Option<&str> {
        Some(self.granted.gpu_uuid.as_str()).filter(|uuid| !uuid.is_empty())
    }

    /// The granted GPU as `CUDA_VISIBLE_DEVICES` should name it: by UUID when
    /// the broker knows it (CUDA's and NVML's indices can differ), else by
    /// index.
    pub fn cuda_visible_devices(&self) -> String {
        match self.gpu_uuid() {
            Some(uuid) => uuid.to_owned(),
            None => self.granted.gpu_index.to_string(),
        }
    }

    /// How long the request waited in the broker's queue.
    pub fn waited(&self) -> Duration {
        Duration::from_millis(self.granted.waited_ms)
    }

    /// The broker's `Granted` message, whole.
    pub fn granted(&self) -> &pb::Granted {
        &self.granted
    }

    /// Whether the lease still stands: neither lost nor released.
    pub fn is_held(&self) -> bool {
        self.requests.is_some() && self.ended.borrow().is_none()
    }

    /// Resolves when the lease is lost, that is ended by anything but its
    /// owner: revoked by the broker (`max_hold`, an operator, shutdown,
    /// preemption) or cut off with the broker or the connection. At once if
    /// that has happened already; never while the lease stands.
    ///
    /// Cancelling it (dropping the future) changes nothing: the lease stands,
    /// and a later call sees the same loss.
    pub async fn lost(&self) -> Lost {
        let mut ended = self.ended.clone();
        match ended.wait_for(Option::is_some).await {
            Ok(lost) => lost.as_ref().cloned().unwrap_or(Lost::Ended),
            // The lease's task is gone without a word (a callback panicked);
            // with it went the call.
            Err(_) => Lost::Ended,
        }
    }

    /// Ends the lease and waits for the broker to confirm that it ended.
    ///
    /// Fails with [`Error::Lost`] when the lease had been lost before the
    /// broker read the release (say, revoked a moment earlier), and with
    /// [`Error::Status`] when the broker ended the call with an error.
    ///
    /// Cancelling it (dropping the future) still ends the lease, as dropping
    /// it does: the release has been sent by the time this first waits; only
    /// the confirmation is not awaited.
    pub async fn release(mut self) -> Result<(), Error> {
        if let Some(lost) = self.ended.borrow().clone() {
            return Err(Error::Lost(lost));
        }
        self.send_release();
        let mut ended = self.ended.clone();
        let end = ended
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|end| end.clone());
        match end {
            Some(Lost::Ended) | None => Ok(()),
            Some(Lost::Failed(status)) => Err(Error::Status(status)),
            Some(lost @ Lost::Revoked { .. }) => Err(Error::Lost(lost)),
        }
    }

    /// Hands the granted call to the lease's task.
    fn hold(call: Call, granted: pb::Granted, on_preempt: Option<PreemptCallback>) -> Self {
        let (ended_tx, ended) = watch::channel(None);
        tokio::spawn(follow(call.events, call.grpc, on_preempt, ended_tx));
        Self {
            granted,
            requests: Some(call.requests),
            ended,
        }
    }

    /// Sends `Release` once; closing the request stream after it.
    fn send_release(&mut self) {
        if let Some(requests) = self.requests.take() {
            // The channel has room: nothing but this follows `Acquire`. If
            // the call is over, there is nothing left to end.
            let _ = requests.try_send(request(RequestKind::Release(pb::Release {})));
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.send_release();
    }
}

/// An open `AcquireLease` call.
struct Call {
    requests: mpsc::Sender<pb::LeaseRequest>,
    events: Streaming<pb::LeaseEvent>,
    /// Keeps the connection up for as long as the call needs it.
    grpc: GrpcClient,
}

/// A call still waiting for its grant: withdrawn politely when dropped, so
/// that a cancelled `acquire()` leaves nothing behind in the queue.
struct Pending(Option<Call>);

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(call) = self.0.take() else { return };
        let _ = call
            .requests
            .try_send(request(RequestKind::Release(pb::Release {})));
        drop(call.requests);
        // Reading on lets the release reach the broker before the stream is
        // reset; without a runtime the call is just cut.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut events = call.events;
                let _grpc = call.grpc;
                let _ = tokio::time::timeout(RELEASE_TIMEOUT, async {
                    while let Ok(Some(_)) = events.message().await {}
                })
                .await;
            });
        }
    }
}

/// The lease's task: reads the granted call until it ends, runs the
/// preemption callback, and records why the call ended. Once nobody holds
/// the lease or waits for its end, it waits at most [`RELEASE_TIMEOUT`] for
/// the broker to end the call.
async fn follow(
    mut events: Streaming<pb::LeaseEvent>,
    _grpc: GrpcClient,
    mut on_preempt: Option<PreemptCallback>,
    ended: watch::Sender<Option<Lost>>,
) {
    let end = async {
        loop {
            match events.message().await {
                Ok(Some(pb::LeaseEvent {
                    kind: Some(EventKind::PreemptRequested(asked)),
                })) => {
                    if let Some(preempt_callback) = on_preempt.as_mut() {
                        preempt_callback(&asked);
                    }
                }
                // The stream ends with ABORTED right after; the reason is
                // the news.
                Ok(Some(pb::LeaseEvent {
                    kind: Some(EventKind::Revoked(revoked)),
                })) => {
                    return Lost::Revoked {
                        reason: revoked.reason(),
                        message: revoked.message,
                    };
                }
                // Nothing else is sent to a holder.
                Ok(Some(_)) => {}
                Ok(None) => return Lost::Ended,
                Err(status) => return Lost::Failed(status),
            }
        }
    };
    let abandoned = async {
        ended.closed().await;
        tokio::time::sleep(RELEASE_TIMEOUT).await;
    };
    let end = tokio::select! {
        end = end => Some(end),
        () = abandoned => None,
    };
    if let Some(end) = end {
        ended.send_replace(Some(end));
    }
}

fn request(kind: RequestKind) -> pb::LeaseRequest {
    pb::LeaseRequest { kind: Some(kind) }
}
