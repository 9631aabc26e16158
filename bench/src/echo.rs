//! The wire's baselines: `LeaseBroker` services that decide (almost)
//! nothing.
//!
//! They serve the same generated service, codec, messages, transport
//! settings and runtime as `gpulease serve`, so the difference between them
//! and the broker is the broker's own cost:
//! - [`Mode::Echo`]: `AcquireLease` answers every message with the same
//!   `Granted` (a bidi ping-pong), `Status` answers at once with a small
//!   snapshot (a unary round trip);
//! - [`Mode::Semaphore`]: `AcquireLease` waits on a bare FIFO semaphore
//!   (tokio's) and holds its permit until the client's next message or the
//!   stream's end: a lock handed between client processes through tonic,
//!   with no queue bookkeeping, statistics or logs. `Status` reports only
//!   `total_grants`, which the handoff runs need.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use gpulease::config::Config;
use gpulease_client::pb::v1 as pb;
use gpulease_client::pb::v1::lease_broker_server::{LeaseBroker, LeaseBrokerServer};
use gpulease_client::pb::v1::lease_event::Kind as EventKind;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

/// How many events may wait to be written to one client, as in the broker.
const EVENT_BUFFER: usize = 8;

/// What the baseline server does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Mode {
    /// Answers every message.
    Echo,
    /// Hands `permits` permits around in FIFO order.
    Semaphore {
        /// How many leases may be held at once.
        permits: usize,
    },
}

/// Serves in `mode` on `127.0.0.1:0` and on `socket`, prints a
/// `listening on` line for each as the broker does, and stops when
/// `commands` closes.
pub(crate) async fn serve(
    mode: Mode,
    socket: &Path,
    mut commands: mpsc::Receiver<String>,
) -> Result<()> {
    let config = Config::defaults();
    let tcp = TcpListener::bind("127.0.0.1:0").await?;
    let tcp_addr = tcp.local_addr()?;
    let _ = std::fs::remove_file(socket);
    let unix = UnixListener::bind(socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    let service = Baseline {
        mode,
        permit: Arc::new(Semaphore::new(match mode {
            Mode::Echo => 1,
            Mode::Semaphore { permits } => permits,
        })),
        grants: Arc::new(AtomicU64::new(0)),
    };
    let router = || {
        Server::builder()
            .http2_keepalive_interval(Some(config.keepalive_interval))
            .http2_keepalive_timeout(Some(config.keepalive_timeout))
            .add_service(LeaseBrokerServer::new(service.clone()))
    };
    let tcp_server = router().serve_with_incoming(TcpIncoming::from(tcp).with_nodelay(Some(true)));
    let unix_server = router().serve_with_incoming(UnixListenerStream::new(unix));
    println!("listening on {tcp_addr}");
    println!("listening on unix:{}", socket.display());
    // Commands are ignored; the end of standard input stops the server.
    let stdin_closed = async { while commands.recv().await.is_some() {} };
    tokio::select! {
        result = tcp_server => result?,
        result = unix_server => result?,
        () = stdin_closed => {}
    }
    let _ = std::fs::remove_file(socket);
    Ok(())
}

/// The service.
#[derive(Clone, Debug)]
struct Baseline {
    mode: Mode,
    permit: Arc<Semaphore>,
    grants: Arc<AtomicU64>,
}

type EventSender = mpsc::Sender<Result<pb::LeaseEvent, Status>>;

fn granted(token: u64) -> pb::LeaseEvent {
    pb::LeaseEvent {
        kind: Some(EventKind::Granted(pb::Granted {
            lease_id: format!("19c3a5b2e40-{token}"),
            fencing_token: token,
            broker_epoch: 1_771_000_000_000,
            gpu_index: 0,
            gpu_uuid: String::new(),
            waited_ms: 0,
        })),
    }
}

fn queued() -> pb::LeaseEvent {
    pb::LeaseEvent {
        kind: Some(EventKind::Queued(pb::Queued {
            position: 1,
            queue_depth: 1,
            ..Default::default()
        })),
    }
}

/// Answers every message of the stream with a `Granted`.
async fn echo(mut inbound: Streaming<pb::LeaseRequest>, events: EventSender) {
    if events.send(Ok(granted(1_000_000))).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(_)) => {
                    if events.send(Ok(granted(1_000_000))).await.is_err() {
                        return;
                    }
                }
                Ok(None) | Err(_) => return,
            },
            () = events.closed() => return,
        }
    }
}

/// Waits for the permit, grants, and holds it until the client's next
/// message or the stream's end.
async fn semaphore(
    permit: Arc<Semaphore>,
    grants: Arc<AtomicU64>,
    mut inbound: Streaming<pb::LeaseRequest>,
    events: EventSender,
) {
    let permit = match Arc::clone(&permit).try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => {
            if events.send(Ok(queued())).await.is_err() {
                return;
            }
            tokio::select! {
                permit = permit.acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                // Any message or end while waiting withdraws.
                _ = inbound.message() => return,
                () = events.closed() => return,
            }
        }
    };
    let token = grants.fetch_add(1, Ordering::Relaxed) + 1;
    if events.send(Ok(granted(token))).await.is_err() {
        return;
    }
    tokio::select! {
        _ = inbound.message() => {}
        () = events.closed() => {}
    }
    drop(permit);
}

#[tonic::async_trait]
impl LeaseBroker for Baseline {
    type AcquireLeaseStream = ReceiverStream<Result<pb::LeaseEvent, Status>>;

    async fn acquire_lease(
        &self,
        request: Request<Streaming<pb::LeaseRequest>>,
    ) -> Result<Response<Self::AcquireLeaseStream>, Status> {
        let mut inbound = request.into_inner();
        // Like the broker, read the first message before answering, and
        // answer from a task through a bounded channel.
        if inbound.message().await?.is_none() {
            return Err(Status::invalid_argument("no first message"));
        }
        let (events, rx) = mpsc::channel(EVENT_BUFFER);
        match self.mode {
            Mode::Echo => tokio::spawn(echo(inbound, events)),
            Mode::Semaphore { .. } => tokio::spawn(semaphore(
                Arc::clone(&self.permit),
                Arc::clone(&self.grants),
                inbound,
                events,
            )),
        };
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(pb::StatusResponse {
            capacity: 1,
            total_grants: self.grants.load(Ordering::Relaxed),
            broker: Some(pb::BrokerInfo {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                epoch: 1_771_000_000_000,
                uptime_ms: 1,
                shutting_down: false,
                ..Default::default()
            }),
            ended: Some(pb::LeaseEndCounts::default()),
            ..Default::default()
        }))
    }

    type WatchStatusStream = Unanswered<pb::StatusResponse>;

    async fn watch_status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        Err(Status::unimplemented(
            "the baseline server has no WatchStatus",
        ))
    }

    type ResidencyStream = Unanswered<pb::ResidencyCommand>;

    async fn residency(
        &self,
        _request: Request<Streaming<pb::ResidencyReport>>,
    ) -> Result<Response<Self::ResidencyStream>, Status> {
        Err(Status::unimplemented(
            "the baseline server has no Residency",
        ))
    }

    async fn revoke_lease(
        &self,
        _request: Request<pb::RevokeLeaseRequest>,
    ) -> Result<Response<pb::RevokeLeaseResponse>, Status> {
        Err(Status::unimplemented(
            "the baseline server has no RevokeLease",
        ))
    }

    async fn reload(
        &self,
        _request: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        Err(Status::unimplemented("the baseline server has no Reload"))
    }
}

/// The stream type of the calls a baseline does not serve.
type Unanswered<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;
