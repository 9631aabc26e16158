//! The gRPC layer: `gpulease.v1.LeaseBroker` on top of [`Broker`].
//!
//! Each streaming RPC has its own session type: [`acquire::Session`] for
//! `AcquireLease`, [`residency::Residency`] for `Residency`, and
//! [`watch::Watch`] for `WatchStatus`. The service builds the session (reading
//! the first message, checking the caller) and spawns its `run`, which
//! writes into a bounded channel that tonic streams back. Sessions only
//! await and convert; every decision is the core's. Errors are typed and
//! become statuses in one table ([`status`]); `convert` holds the protobuf
//! conversions.

mod acquire;
mod convert;
mod residency;
mod routes;
mod status;
mod watch;

pub(crate) use routes::routes;
pub(crate) use status::rewrite_too_large;
use status::{ReloadCallError, RequestError};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, Span};

use crate::auth::Authority;
use crate::broker::{Broker, RevokeOutcome, SessionGuard};
use crate::core::FencingToken;
use crate::pb::v1 as pb;
use crate::pb::v1::lease_broker_server::LeaseBroker;
use crate::reload::Reloader;

/// How many events may wait to be written to one client.
const EVENT_BUFFER: usize = 8;

/// The `LeaseBroker` service.
#[derive(Clone, Debug)]
pub(crate) struct LeaseService {
    broker: Arc<Broker>,
    authority: Arc<Authority>,
    reloader: Option<Arc<Reloader>>,
}

impl LeaseService {
    /// A service answering for `broker`, by the rules of `authority`.
    pub(crate) fn new(broker: Arc<Broker>, authority: Arc<Authority>) -> Self {
        Self {
            broker,
            authority,
            reloader: None,
        }
    }

    /// The same, with `Reload` served by `reloader`.
    pub(crate) fn with_reloader(mut self, reloader: Arc<Reloader>) -> Self {
        self.reloader = Some(reloader);
        self
    }
}

/// The stream of events of one `AcquireLease` call.
pub(crate) type LeaseEventStream = SessionStream<Result<pb::LeaseEvent, Status>>;

/// The stream of unload requests of one `Residency` call.
pub(crate) type ResidencyStream = SessionStream<Result<pb::ResidencyCommand, Status>>;

/// The stream of snapshots of one `WatchStatus` call.
pub(crate) type StatusStream =
    Pin<Box<dyn Stream<Item = Result<pb::StatusResponse, Status>> + Send>>;

/// A response stream that counts as a stream being served (see
/// [`Broker::session`]) until tonic drops it, which it does once the last
/// message and the status are handed to HTTP/2, or the call is reset. So
/// shutdown knows when every client's last word is on its way, and closes
/// the connections only then.
#[derive(Debug)]
pub(crate) struct SessionStream<T> {
    inner: ReceiverStream<T>,
    _served: SessionGuard,
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
        let (events, rx) = mpsc::channel(EVENT_BUFFER);
        match acquire::Session::start(self, request, events).await {
            Ok((session, span)) => Ok(Response::new(self.spawn(session.run(), span, rx))),
            Err(status) => {
                self.broker.metrics().rejected(status.code());
                Err(status)
            }
        }
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.authority
            .may_read_status(&Authority::caller(&request))?;
        let waiters = convert::waiters_listed(request.get_ref());
        Ok(Response::new(snapshot(&self.broker, waiters)))
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
        let (commands, rx) = mpsc::channel(EVENT_BUFFER);
        let (session, span) = residency::Residency::start(self, request, commands).await?;
        Ok(Response::new(self.spawn(session.run(), span, rx)))
    }

    type WatchStatusStream = StatusStream;

    async fn watch_status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        self.authority
            .may_read_status(&Authority::caller(&request))?;
        // One snapshot at a time: a slow reader gets the latest, not a
        // backlog.
        let (snapshots, rx) = mpsc::channel(1);
        let session = watch::Watch::new(&self.broker, request.get_ref(), snapshots);
        let stream = self.spawn(session.run(), Span::current(), rx);
        Ok(Response::new(Box::pin(stream)))
    }
}

impl LeaseService {
    /// Spawns a session's `run` in `span`, and returns the response stream
    /// that reads what it writes. The task and the stream each count as
    /// served until they end.
    fn spawn<T>(
        &self,
        run: impl Future<Output = ()> + Send + 'static,
        span: Span,
        receiver: mpsc::Receiver<T>,
    ) -> SessionStream<T> {
        let guard = self.broker.session();
        tokio::spawn(
            async move {
                run.await;
                drop(guard);
            }
            .instrument(span),
        );
        SessionStream {
            inner: ReceiverStream::new(receiver),
            _served: self.broker.session(),
        }
    }
}

/// The broker's status, listing at most `waiters` waiters.
fn snapshot(broker: &Broker, waiters: usize) -> pb::StatusResponse {
    let now = std::time::Instant::now();
    convert::status(&broker.status_listing(waiters), now, waiters)
}
