//! The gRPC layer: `gpulease.v1.LeaseBroker` on top of [`Broker`].
//!
//! Each `AcquireLease` call becomes one session task that reads the client's
//! messages, awaits the broker, and writes events into a bounded channel that
//! tonic streams back. The session only awaits and converts; every decision
//! is the core's. Any end of the client's stream (a `Release`, a half-close,
//! a reset, a lost connection) ends the session, and the `Ticket` and `Lease`
//! guards it holds give back the place or the permit when they drop.

mod convert;
mod status;

pub(crate) use status::rewrite_too_large;
use status::{ReloadCallError, RequestError, SessionError};

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info_span};

use crate::auth::Authority;
use crate::broker::{Broker, Lease, RevokeOutcome, SessionGuard, Ticket};
use crate::core::{FencingToken, LeaseEnd, RevokeReason, Withdrawal};
use crate::pb::v1 as pb;
use crate::pb::v1::lease_broker_server::LeaseBroker;
use crate::pb::v1::lease_request::Kind as RequestKind;
use crate::reload::Reloader;

/// How long a client may take to send its first message after it opened
/// `AcquireLease`: a call that never says what it wants holds nothing, but
/// should not hold a task forever either.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// How many events may wait to be written to one client.
const EVENT_BUFFER: usize = 8;

/// How long after a clean end of the client's stream the broker looks for
/// the call going away, to record a cancel or a lost connection as such.
const HALF_CLOSE_SETTLE: Duration = Duration::from_millis(20);

/// How long the broker waits to hand a client its final `Revoked` before it
/// ends the stream regardless.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a finished call keeps reading the client's stream, so that the
/// client sees the end of the response before its stream is reset.
const LINGER: Duration = Duration::from_millis(500);

/// The `LeaseBroker` service.
#[derive(Clone, Debug)]
pub struct LeaseService {
    broker: Arc<Broker>,
    authority: Arc<Authority>,
    reloader: Option<Arc<Reloader>>,
}

impl LeaseService {
    /// A service answering for `broker`, by the rules of `authority`.
    pub fn new(broker: Arc<Broker>, authority: Arc<Authority>) -> Self {
        Self {
            broker,
            authority,
            reloader: None,
        }
    }

    /// The same, with `Reload` served by `reloader`.
    pub fn with_reloader(mut self, reloader: Arc<Reloader>) -> Self {
        self.reloader = Some(reloader);
        self
    }
}

type EventSender = mpsc::Sender<Result<pb::LeaseEvent, Status>>;

/// The stream of events of one `AcquireLease` call.
pub type LeaseEventStream = SessionStream<Result<pb::LeaseEvent, Status>>;

/// The stream of unload requests of one `Residency` call.
pub type ResidencyStream = SessionStream<Result<pb::ResidencyCommand, Status>>;

/// The stream of snapshots of one `WatchStatus` call.
pub type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::StatusResponse, Status>> + Send>>;

/// A response stream that counts as a stream being served (see
/// [`Broker::session`]) until tonic drops it, which it does once the last
/// message and the status are handed to HTTP/2, or the call is reset. So
/// shutdown knows when every client's last word is on its way, and closes
/// the connections only then.
#[derive(Debug)]
pub struct SessionStream<T> {
    inner: ReceiverStream<T>,
    _served: SessionGuard,
}

impl<T> SessionStream<T> {
    fn new(receiver: mpsc::Receiver<T>, served: SessionGuard) -> Self {
        Self {
            inner: ReceiverStream::new(receiver),
            _served: served,
        }
    }
}

impl<T> Stream for SessionStream<T> {
    type Item = T;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

#[tonic::async_trait]
impl LeaseBroker for LeaseService {
    type AcquireLeaseStream = LeaseEventStream;

    async fn acquire_lease(
        &self,
        request: Request<Streaming<pb::LeaseRequest>>,
    ) -> Result<Response<Self::AcquireLeaseStream>, Status> {
        let started = self.start_lease(request).await;
        if let Err(status) = &started {
            self.broker.metrics().rejected(status.code());
        }
        started
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.authority
            .may_read_status(&Authority::caller(&request))?;
        let waiters = convert::waiters_listed(request.get_ref());
        Ok(Response::new(self.snapshot(waiters)))
    }

    async fn revoke_lease(
        &self,
        request: Request<pb::RevokeLeaseRequest>,
    ) -> Result<Response<pb::RevokeLeaseResponse>, Status> {
        self.authority
            .may_administer(&Authority::caller(&request))?;
        let request = request.into_inner();
        let (epoch, token) = if request.lease_id.is_empty() {
            (None, request.fencing_token)
        } else {
            convert::parse_lease_id(&request.lease_id)
                .ok_or_else(|| RequestError::NotALeaseId(request.lease_id.clone()))?
        };
        if token == 0 {
            return Err(RequestError::NoLeaseNamed.into());
        }
        let message = if request.message.is_empty() {
            "revoked by an operator".to_owned()
        } else {
            request.message
        };
        let outcome = self.broker.revoke(epoch, FencingToken(token), &message);
        let response = match outcome {
            RevokeOutcome::Revoked { consumer } => {
                tracing::warn!(%consumer, token, %message, "lease revoked by an operator");
                pb::RevokeLeaseResponse {
                    revoked: true,
                    message: format!("revoked the lease of {consumer}"),
                    consumer,
                }
            }
            RevokeOutcome::NotHeld(message) => pb::RevokeLeaseResponse {
                revoked: false,
                message,
                consumer: String::new(),
            },
        };
        Ok(Response::new(response))
    }

    async fn reload(
        &self,
        request: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        self.authority
            .may_administer(&Authority::caller(&request))?;
        let reloader = self.reloader.clone().ok_or(ReloadCallError::Unsupported)?;
        tracing::info!("reload asked for over the API");
        // It reads files: off the async threads.
        let report = tokio::task::spawn_blocking(move || reloader.reload())
            .await
            .map_err(|e| ReloadCallError::Failed(e.to_string()))?
            .map_err(ReloadCallError::Refused)?;
        Ok(Response::new(convert::reloaded(report)))
    }

    type ResidencyStream = ResidencyStream;

    async fn residency(
        &self,
        request: Request<Streaming<pb::ResidencyReport>>,
    ) -> Result<Response<Self::ResidencyStream>, Status> {
        let caller = Authority::caller(&request);
        let mut inbound = request.into_inner();
        let limits = self.broker.limits();
        let hello = inbound
            .message()
            .await
            .map_err(|status| status::inbound_error(status, &limits))?;
        let consumer = match hello {
            Some(pb::ResidencyReport {
                kind: Some(pb::residency_report::Kind::Hello(hello)),
            }) => hello.consumer,
            _ => return Err(RequestError::FirstNotHello.into()),
        };
        crate::core::validate_consumer_name(&consumer).map_err(RequestError::BadName)?;
        self.authority.may_act_as(&caller, &consumer)?;
        let mut listener = self.broker.listen_for_unloads(consumer.clone());
        let deadline = self.broker.unload_timeout();
        let shutdown = self.broker.shutdown_token().clone();
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let span = info_span!("residency", %consumer);
        let guard = self.broker.session();
        tokio::spawn(
            async move {
                let _guard = guard;
                loop {
                    tokio::select! {
                        request = listener.next() => {
                            let Some(request) = request else { return };
                            let command = convert::unload_requested(&request, deadline);
                            if tx.send(Ok(command)).await.is_err() {
                                return;
                            }
                        }
                        report = inbound.message() => match report {
                            Ok(Some(pb::ResidencyReport {
                                kind: Some(pb::residency_report::Kind::Unloaded(unloaded)),
                            })) => {
                                let _ = listener.unloaded((!unloaded.all_gpus).then_some(unloaded.gpu_index));
                            }
                            Ok(Some(_)) => {
                                let _ = tx.send(Err(RequestError::NotUnloaded.into())).await;
                                return;
                            }
                            Ok(None) | Err(_) => return,
                        },
                        () = tx.closed() => return,
                        () = shutdown.cancelled() => {
                            let _ = tx.send(Err(SessionError::ShuttingDown.into())).await;
                            return;
                        }
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(SessionStream::new(rx, self.broker.session())))
    }

    type WatchStatusStream = StatusStream;

    async fn watch_status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        self.authority
            .may_read_status(&Authority::caller(&request))?;
        let waiters = convert::waiters_listed(request.get_ref());
        let service = self.clone();
        let mut changes = self.broker.subscribe();
        let (tx, rx) = mpsc::channel(1);
        let guard = self.broker.session();
        tokio::spawn(async move {
            let _guard = guard;
            loop {
                changes.borrow_and_update();
                if tx.send(Ok(service.snapshot(waiters))).await.is_err() {
                    return;
                }
                // A burst of changes while the snapshot was being sent marks
                // the receiver once: the next snapshot covers all of them.
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                    () = service.broker.shutdown_token().cancelled() => {
                        let _ = tx.send(Ok(service.snapshot(waiters))).await;
                        return;
                    }
                }
            }
        });
        let stream = SessionStream::new(rx, self.broker.session());
        Ok(Response::new(Box::pin(stream)))
    }
}

impl LeaseService {
    /// `AcquireLease` up to joining the queue; an error here is a refusal.
    async fn start_lease(
        &self,
        request: Request<Streaming<pb::LeaseRequest>>,
    ) -> Result<Response<LeaseEventStream>, Status> {
        let peer = request.remote_addr();
        let caller = Authority::caller(&request);
        // The request's extensions say which connection it came on.
        let (_, extensions, mut inbound) = request.into_parts();
        let connection = Request::from_parts(Default::default(), extensions, ());
        let first = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, inbound.message())
            .await
            .map_err(|_| RequestError::NoAcquireInTime(FIRST_MESSAGE_TIMEOUT))?;
        let limits = self.broker.limits();
        let first = first.map_err(|status| status::inbound_error(status, &limits))?;
        let acquire = match first {
            Some(pb::LeaseRequest {
                kind: Some(RequestKind::Acquire(acquire)),
            }) => acquire,
            Some(_) => return Err(RequestError::FirstNotAcquire.into()),
            None => return Err(RequestError::EndedBeforeAcquire.into()),
        };
        self.authority.may_act_as(&caller, &acquire.consumer)?;
        convert::check_labels(&acquire.labels, &limits)?;
        let max_wait = (acquire.max_wait_ms > 0)
            .then(|| Duration::from_millis(u64::from(acquire.max_wait_ms)));
        let seen = self
            .authority
            .seen(&connection, &caller, &acquire.consumer, acquire.client_pid)
            .await;
        let decision = crate::peer::attribute(seen, &acquire.consumer).await;
        let mut request = convert::request(acquire);
        request.client_pid = decision.pid;
        request.attribution = decision.attribution;
        let span = info_span!("lease", consumer = %request.consumer, peer = ?peer);
        let ticket = self.broker.enqueue(request)?;
        let (events, rx) = mpsc::channel(EVENT_BUFFER);
        let session = Session {
            broker: Arc::clone(&self.broker),
            inbound,
            events,
        };
        let guard = self.broker.session();
        tokio::spawn(
            async move {
                session.run(ticket, max_wait).await;
                drop(guard);
            }
            .instrument(span),
        );
        Ok(Response::new(SessionStream::new(rx, self.broker.session())))
    }

    fn snapshot(&self, waiters: usize) -> pb::StatusResponse {
        let now = std::time::Instant::now();
        convert::status(&self.broker.status_listing(waiters), now, waiters)
    }
}

/// One `AcquireLease` call after its `acquire`: waits, then holds.
struct Session {
    broker: Arc<Broker>,
    inbound: Streaming<pb::LeaseRequest>,
    events: EventSender,
}

/// How a session's waiting ended.
enum Waited {
    Granted(Lease),
    /// The session is over; the status to end the stream with, if any.
    Over(Option<Status>),
}

impl Session {
    /// The whole call: the conversation, then the end of the response
    /// (its status goes out as `events` is dropped), then a short linger.
    async fn run(mut self, ticket: Ticket, max_wait: Option<Duration>) {
        self.converse(ticket, max_wait).await;
        let Self {
            mut inbound,
            events,
            ..
        } = self;
        drop(events);
        // If the client has not half-closed, dropping its request stream now
        // would make HTTP/2 reset the stream right behind the trailers; a
        // strict client (grpclib) then reports the reset, and drops the
        // messages it had not yet read (a `revoked`, the status). Give it a
        // moment to read them and close its side.
        let _ = tokio::time::timeout(LINGER, async {
            while let Ok(Some(_)) = inbound.message().await {}
        })
        .await;
    }

    async fn converse(&mut self, ticket: Ticket, max_wait: Option<Duration>) {
        let lease = match self.wait(ticket, max_wait).await {
            Waited::Granted(lease) => lease,
            Waited::Over(status) => {
                if let Some(status) = status {
                    let _ = self.events.send(Err(status)).await;
                }
                return;
            }
        };
        let (how, status) = self.hold(&lease).await;
        if let LeaseEnd::Revoked(reason) = how {
            let mut message = SessionError::Revoked(reason).to_string();
            let (_, said) = lease.revocation().reason();
            if matches!(reason, RevokeReason::Admin | RevokeReason::Preempted) && !said.is_empty() {
                message = format!("{message}: {said}");
            }
            self.farewell(Ok(convert::revoked(reason, &message))).await;
            lease.end(how);
            self.farewell(Err(SessionError::Revoked(reason).into()))
                .await;
        } else {
            lease.end(how);
            if let Some(status) = status {
                self.farewell(Err(status)).await;
            }
        }
    }

    /// Waits in the queue until granted, or until the client, the clock or
    /// the broker ends the wait.
    ///
    /// Dropping this future (the task is aborted) drops the ticket, which
    /// gives up the place in the queue.
    async fn wait(&mut self, mut ticket: Ticket, max_wait: Option<Duration>) -> Waited {
        let deadline = max_wait.map(|wait| Instant::now() + wait);
        let epoch = self.broker.epoch();
        // Tell the client at once that it waits, unless it was granted as
        // it arrived.
        if !ticket.had_to_wait()
            && let Some(lease) = ticket.try_granted()
        {
            return self.granted(lease).await;
        }
        let mut positions = ticket.take_positions();
        if self
            .events
            .send(Ok(convert::queued(positions.current(), epoch)))
            .await
            .is_err()
        {
            return Waited::Over(None);
        }
        loop {
            tokio::select! {
                biased;
                lease = ticket.granted() => {
                    return match lease {
                        Some(lease) => self.granted(lease).await,
                        None => Waited::Over(Some(SessionError::ShuttingDown.into())),
                    };
                }
                message = self.inbound.message() => {
                    match message {
                        Ok(Some(pb::LeaseRequest { kind: Some(RequestKind::Release(_)) })) => {
                            debug!("withdrew before the grant");
                            return self.stop_waiting(ticket, Withdrawal::Withdrawn, None).await;
                        }
                        Ok(Some(_)) => {
                            let status = RequestError::NotReleaseWhileWaiting.into();
                            return self.stop_waiting(ticket, Withdrawal::Withdrawn, Some(status)).await;
                        }
                        Ok(None) | Err(_) => {
                            debug!("stream ended before the grant");
                            return self.stop_waiting(ticket, Withdrawal::Withdrawn, None).await;
                        }
                    }
                }
                () = self.events.closed() => {
                    debug!("call cancelled before the grant");
                    return self.stop_waiting(ticket, Withdrawal::Withdrawn, None).await;
                }
                () = sleep_until(deadline) => {
                    let status = SessionError::NotGrantedInTime(max_wait.unwrap_or_default()).into();
                    return self.stop_waiting(ticket, Withdrawal::Expired, Some(status)).await;
                }
                position = positions.improved() => {
                    // Best effort: a client that does not read loses only
                    // position updates, never the grant.
                    let _ = self.events.try_send(Ok(convert::queued(position, epoch)));
                }
            }
        }
    }

    /// Withdraws the ticket; if the grant won the race, the lease ends at
    /// once, unclaimed (the consumer never heard of it), unless the wait
    /// merely expired, in which case the grant stands.
    async fn stop_waiting(
        &mut self,
        ticket: Ticket,
        how: Withdrawal,
        status: Option<Status>,
    ) -> Waited {
        if let Some(lease) = ticket.withdraw(how) {
            if how == Withdrawal::Expired {
                // The grant came first: it stands.
                return self.granted(lease).await;
            }
            lease.end(LeaseEnd::Unclaimed);
        }
        Waited::Over(status)
    }

    async fn granted(&mut self, lease: Lease) -> Waited {
        if self
            .events
            .send(Ok(convert::granted(lease.grant())))
            .await
            .is_err()
        {
            // The client is gone before it heard of the grant.
            lease.end(LeaseEnd::Unclaimed);
            return Waited::Over(None);
        }
        Waited::Granted(lease)
    }

    /// Holds the lease until the client or the broker ends it; returns how
    /// it ended and the status to end the stream with, if any. A request to
    /// make way (preemption) is passed on to the client once, and the lease
    /// is held on.
    async fn hold(&mut self, lease: &Lease) -> (LeaseEnd, Option<Status>) {
        let mut told_to_make_way = false;
        loop {
            tokio::select! {
                () = lease.revocation().preempt_requested(), if !told_to_make_way => {
                    told_to_make_way = true;
                    if let Some(notice) = lease.revocation().preempt_notice() {
                        // Best effort, like position updates: a client that
                        // does not read still loses the lease at the end of
                        // the grace.
                        let _ = self.events.try_send(Ok(convert::preempt_requested(notice)));
                    }
                }
                ended = self.hold_once(lease) => return ended,
            }
        }
    }

    /// [`Session::hold`] without the preemption request: resolves once the
    /// lease ends. Cancel-safe except for a half-close's settling wait,
    /// which is why [`Session::hold`] only cancels it for an event that
    /// comes before the stream ends.
    async fn hold_once(&mut self, lease: &Lease) -> (LeaseEnd, Option<Status>) {
        let shutdown = self.broker.shutdown_token().clone();
        let mut max_hold = self.broker.max_hold_changes();
        loop {
            let deadline = lease.deadline();
            tokio::select! {
                // A reload changed `max_hold`: the deadline moves.
                changed = max_hold.changed() => {
                    if changed.is_err() {
                        // The broker is gone; shutdown ends the lease.
                        return (LeaseEnd::Revoked(RevokeReason::Shutdown), None);
                    }
                    continue;
                }
                ended = self.hold_until(lease, deadline, &shutdown) => return ended,
            }
        }
    }

    /// Holds the lease until the client or the broker ends it, or
    /// `deadline` passes. Cancel-safe: dropping it loses no message.
    async fn hold_until(
        &mut self,
        lease: &Lease,
        deadline: Option<Instant>,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> (LeaseEnd, Option<Status>) {
        tokio::select! {
            message = self.inbound.message() => match message {
                Ok(Some(pb::LeaseRequest { kind: Some(RequestKind::Release(_)) })) => {
                    (LeaseEnd::Released, None)
                }
                Ok(Some(_)) => (
                    LeaseEnd::Disconnected,
                    Some(RequestError::NotReleaseWhileHolding.into()),
                ),
                Ok(None) => (self.half_closed_or_gone().await, None),
                Err(_) => (LeaseEnd::Disconnected, None),
            },
            () = self.events.closed() => (LeaseEnd::Disconnected, None),
            () = shutdown.cancelled() => (LeaseEnd::Revoked(RevokeReason::Shutdown), None),
            () = sleep_until(deadline) => (LeaseEnd::Revoked(RevokeReason::MaxHoldExceeded), None),
            () = lease.revocation().fired() => {
                (LeaseEnd::Revoked(lease.revocation().reason().0), None)
            }
        }
    }

    /// Tells a polite half-close from a call that is going away. A cancel
    /// from grpcio and a connection dropped for a missed keepalive both first
    /// look like a half-close (the inbound stream ends cleanly); the
    /// response side closes a moment later. Only the recorded cause depends
    /// on this wait.
    async fn half_closed_or_gone(&self) -> LeaseEnd {
        match tokio::time::timeout(HALF_CLOSE_SETTLE, self.events.closed()).await {
            Ok(()) => LeaseEnd::Disconnected,
            Err(_) => LeaseEnd::HalfClosed,
        }
    }

    /// Sends a last message, bounded in time so that a client that stopped
    /// reading cannot hold the session (or shutdown) up.
    async fn farewell(&self, item: Result<pb::LeaseEvent, Status>) {
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, self.events.send(item)).await;
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
