//! `AcquireLease`: one [`Session`] per call, which waits in the queue, then
//! holds the lease, until the client or the broker ends it.
//!
//! Any end of the client's stream (a `Release`, a half-close, a reset, a
//! lost connection) ends the session, and the `Ticket` and `Lease` guards it
//! holds give back the place or the permit when they drop.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Request, Status, Streaming};
use tracing::{Span, debug, info_span};

use super::status::{self, LimitError, RequestError, ServiceError, SessionError};
use super::{LeaseService, convert};
use crate::auth::Authority;
use crate::broker::{Broker, Lease, Ticket};
use crate::config::Limits;
use crate::core::{LeaseEnd, RevokeReason, Withdrawal};
use crate::pb::v1 as pb;
use crate::pb::v1::lease_request::Kind as RequestKind;

/// How long a client may take to send its first message after it opened
/// `AcquireLease`: a call that never says what it wants holds nothing, but
/// should not hold a task forever either.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long after a clean end of the client's stream the broker looks for
/// the call going away, to record a cancel or a lost connection as such.
const HALF_CLOSE_SETTLE: Duration = Duration::from_millis(20);

/// How long the broker waits to hand a client its final `Revoked` before it
/// ends the stream regardless.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a finished call keeps reading the client's stream, so that the
/// client sees the end of the response before its stream is reset.
const LINGER: Duration = Duration::from_millis(500);

/// Where a session writes the client's events.
pub(super) type EventSender = mpsc::Sender<Result<pb::LeaseEvent, Status>>;

/// One `AcquireLease` call that has joined the queue: its place, and the
/// call it waits and then holds in.
pub(super) struct Session {
    call: Call,
    ticket: Ticket,
}

/// The two ends of one call: the client's messages, and the events back.
struct Call {
    broker: Arc<Broker>,
    inbound: Streaming<pb::LeaseRequest>,
    events: EventSender,
    max_wait: Option<Duration>,
}

/// How a session's waiting ended.
enum Waited {
    Granted(Lease),
    /// The session is over; the status to end the stream with, if any.
    Over(Option<Status>),
}

impl Session {
    /// `AcquireLease` up to joining the queue: reads the `acquire`, checks
    /// the caller and the labels, attributes the client's process, and
    /// enqueues. An error here is a refusal. Returns the session and the
    /// span its task runs in.
    pub(super) async fn start(
        service: &LeaseService,
        request: Request<Streaming<pb::LeaseRequest>>,
        events: EventSender,
    ) -> Result<(Self, Span), Status> {
        let peer = request.remote_addr();
        let caller = Authority::caller(&request);
        // The request's extensions say which connection it came on.
        let (_, extensions, mut inbound) = request.into_parts();
        let connection = Request::from_parts(Default::default(), extensions, ());
        let limits = service.broker.limits();
        let acquire = first_acquire(&mut inbound, &limits).await?;
        service.authority.may_act_as(&caller, &acquire.consumer)?;
        check_labels(&acquire.labels, &limits)?;
        let max_wait = (acquire.max_wait_ms > 0)
            .then(|| Duration::from_millis(u64::from(acquire.max_wait_ms)));
        let seen = service
            .authority
            .seen(&connection, &caller, &acquire.consumer, acquire.client_pid)
            .await;
        let decision = crate::peer::attribute(seen, &acquire.consumer).await;
        let mut request = convert::request(acquire);
        request.client_pid = decision.pid;
        request.attribution = decision.attribution;
        let span = info_span!("lease", consumer = %request.consumer, peer = ?peer);
        let ticket = service.broker.enqueue(request)?;
        let call = Call {
            broker: Arc::clone(&service.broker),
            inbound,
            events,
            max_wait,
        };
        Ok((Self { call, ticket }, span))
    }

    /// The whole call: the conversation, then the end of the response
    /// (its status goes out as the event sender is dropped), then a short
    /// linger.
    pub(super) async fn run(self) {
        let Self { mut call, ticket } = self;
        call.converse(ticket).await;
        let Call {
            mut inbound,
            events,
            ..
        } = call;
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
}

/// The call's first message, which must be an `acquire`, within
/// [`FIRST_MESSAGE_TIMEOUT`].
async fn first_acquire(
    inbound: &mut Streaming<pb::LeaseRequest>,
    limits: &Limits,
) -> Result<pb::Acquire, ServiceError> {
    let first = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, inbound.message())
        .await
        .map_err(|_| RequestError::NoAcquireInTime(FIRST_MESSAGE_TIMEOUT))?
        .map_err(|status| status::inbound_error(status, limits))?;
    match first {
        Some(pb::LeaseRequest {
            kind: Some(RequestKind::Acquire(acquire)),
        }) => Ok(acquire),
        Some(_) => Err(RequestError::FirstNotAcquire.into()),
        None => Err(RequestError::EndedBeforeAcquire.into()),
    }
}

/// Refuses labels beyond `[limits]`: too many, an empty key, or a key or
/// value too long. Labels are copied into Status and `Queued`, so their size
/// is bounded before anything keeps them.
fn check_labels(
    labels: &std::collections::HashMap<String, String>,
    limits: &Limits,
) -> Result<(), LimitError> {
    let count = labels.len();
    if count > limits.max_labels as usize {
        return Err(LimitError::TooManyLabels {
            count,
            max: limits.max_labels,
        });
    }
    for (key, value) in labels {
        if key.is_empty() {
            return Err(LimitError::EmptyLabelKey);
        }
        if key.len() > limits.max_label_key_bytes as usize {
            return Err(LimitError::LabelKeyTooLong {
                prefix: prefix(key).to_owned(),
                bytes: key.len(),
                max: limits.max_label_key_bytes,
            });
        }
        if value.len() > limits.max_label_value_bytes as usize {
            return Err(LimitError::LabelValueTooLong {
                prefix: prefix(key).to_owned(),
                bytes: value.len(),
                max: limits.max_label_value_bytes,
            });
        }
    }
    Ok(())
}

/// The first few characters of `text`, to name it in a message without
/// echoing all of it.
fn prefix(text: &str) -> &str {
    let end = text
        .char_indices()
        .nth(32)
        .map_or(text.len(), |(index, _)| index);
    &text[..end]
}

impl Call {
    /// Waits, then holds, then says goodbye: the whole conversation.
    async fn converse(&mut self, ticket: Ticket) {
        let lease = match self.wait(ticket).await {
            Waited::Granted(lease) => lease,
            Waited::Over(status) => {
                if let Some(status) = status {
                    let _ = self.events.send(Err(status)).await;
                }
                return;
            }
        };
        let (how, status) = self.hold(&lease).await;
        match how {
            LeaseEnd::Revoked(reason) => self.revoked(lease, reason).await,
            how => {
                lease.end(how);
                if let Some(status) = status {
                    self.farewell(Err(status)).await;
                }
            }
        }
    }

    /// The end of a lease the broker took back: `Revoked` (with the
    /// operator's or the preemption's words), the end, then the status.
    async fn revoked(&mut self, lease: Lease, reason: RevokeReason) {
        let mut message = SessionError::Revoked(reason).to_string();
        let (_, said) = lease.revocation().reason();
        if matches!(reason, RevokeReason::Admin | RevokeReason::Preempted) && !said.is_empty() {
            message = format!("{message}: {said}");
        }
        self.farewell(Ok(convert::revoked(reason, &message))).await;
        lease.end(LeaseEnd::Revoked(reason));
        self.farewell(Err(SessionError::Revoked(reason).into()))
            .await;
    }

    /// Waits in the queue until granted, or until the client, the clock or
    /// the broker ends the wait.
    ///
    /// Dropping this future (the task is aborted) drops the ticket, which
    /// gives up the place in the queue.
    async fn wait(&mut self, mut ticket: Ticket) -> Waited {
        let deadline = self.max_wait.map(|wait| Instant::now() + wait);
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
                // A grant that is ready wins over a message, a cancel or the
                // deadline that came with it, and position updates come last.
                biased;
                lease = ticket.granted() => return match lease {
                    Some(lease) => self.granted(lease).await,
                    None => Waited::Over(Some(SessionError::ShuttingDown.into())),
                },
                message = self.inbound.message() => {
                    return self.message_while_waiting(ticket, message).await;
                }
                () = self.events.closed() => {
                    debug!("call cancelled before the grant");
                    return self.stop_waiting(ticket, Withdrawal::Withdrawn, None).await;
                }
                () = sleep_until(deadline) => return self.expired(ticket).await,
                position = positions.improved() => {
                    // Best effort: a client that does not read loses only
                    // position updates, never the grant.
                    let _ = self.events.try_send(Ok(convert::queued(position, epoch)));
                }
            }
        }
    }

    /// A waiter's message, or the end of its stream: either ends the wait.
    async fn message_while_waiting(
        &mut self,
        ticket: Ticket,
        message: Result<Option<pb::LeaseRequest>, Status>,
    ) -> Waited {
        let status = match message {
            Ok(Some(pb::LeaseRequest {
                kind: Some(RequestKind::Release(_)),
            })) => {
                debug!("withdrew before the grant");
                None
            }
            Ok(Some(_)) => Some(RequestError::NotReleaseWhileWaiting.into()),
            Ok(None) | Err(_) => {
                debug!("stream ended before the grant");
                None
            }
        };
        self.stop_waiting(ticket, Withdrawal::Withdrawn, status)
            .await
    }

    /// `max_wait_ms` passed before the grant.
    async fn expired(&mut self, ticket: Ticket) -> Waited {
        let waited = self.max_wait.unwrap_or_default();
        let status = SessionError::NotGrantedInTime(waited).into();
        self.stop_waiting(ticket, Withdrawal::Expired, Some(status))
            .await
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
                    self.make_way(lease);
                }
                ended = self.hold_once(lease) => return ended,
            }
        }
    }

    /// Passes a preemption request on to the client.
    fn make_way(&self, lease: &Lease) {
        if let Some(notice) = lease.revocation().preempt_notice() {
            // Best effort, like position updates: a client that does not
            // read still loses the lease at the end of the grace.
            let _ = self.events.try_send(Ok(convert::preempt_requested(notice)));
        }
    }

    /// [`Call::hold`] without the preemption request: resolves once the
    /// lease ends. Cancel-safe except for a half-close's settling wait,
    /// which is why [`Call::hold`] only cancels it for an event that comes
    /// before the stream ends.
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
            message = self.inbound.message() => self.message_while_holding(message).await,
            () = self.events.closed() => (LeaseEnd::Disconnected, None),
            () = shutdown.cancelled() => (LeaseEnd::Revoked(RevokeReason::Shutdown), None),
            () = sleep_until(deadline) => (LeaseEnd::Revoked(RevokeReason::MaxHoldExceeded), None),
            () = lease.revocation().fired() => {
                (LeaseEnd::Revoked(lease.revocation().reason().0), None)
            }
        }
    }

    /// A holder's message, or the end of its stream: either ends the lease.
    async fn message_while_holding(
        &self,
        message: Result<Option<pb::LeaseRequest>, Status>,
    ) -> (LeaseEnd, Option<Status>) {
        match message {
            Ok(Some(pb::LeaseRequest {
                kind: Some(RequestKind::Release(_)),
            })) => (LeaseEnd::Released, None),
            Ok(Some(_)) => (
                LeaseEnd::Disconnected,
                Some(RequestError::NotReleaseWhileHolding.into()),
            ),
            Ok(None) => (self.half_closed_or_gone().await, None),
            Err(_) => (LeaseEnd::Disconnected, None),
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
