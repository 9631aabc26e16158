//! `gpulease gate`: a lease around the HTTP requests to a server that
//! cannot take one itself (ollama, a TTS server).
//!
//! A small HTTP/1.1 reverse proxy on hyper that is an ordinary consumer of
//! the broker. While at least one request is in flight it holds one lease,
//! shared by all of them; after the last one ends it keeps the lease for
//! `linger` (a chat's next turn should not queue again), then releases.
//! Bodies stream through unchanged in both directions, frame by frame, never
//! buffered (chunked bodies, NDJSON, server-sent events). A request is in
//! flight until its response body has been sent or the client went away:
//! hyper drops the response body then, and with it the request's
//! [`InFlight`] guard. A request that waits longer than `max_wait` for the
//! lease is answered 503 with `Retry-After`.
//!
//! The lease itself lives in one task ([`keep_lease`]) that follows the
//! number of requests in flight (a `watch` channel) and publishes where the
//! lease stands (another), so that no request handler ever owns the lease.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use gpulease_client::Lease;

use crate::pb::v1 as pb;

/// What one gate does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GateSettings {
    /// The consumer its leases are for.
    pub consumer: String,
    /// Where it listens for HTTP.
    pub listen: SocketAddr,
    /// The server it forwards to (`http://HOST:PORT`).
    pub upstream: Uri,
    /// The GPU memory a request needs, in MiB (0 = unknown).
    pub vram_mib: u64,
    /// How long a request may wait for the lease; `None` waits forever.
    pub max_wait: Option<Duration>,
    /// How long the lease is kept after the last request ends.
    pub linger: Duration,
}

/// Connects to the broker, once per lease.
pub(crate) type Connect = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<gpulease_client::Client, String>> + Send>>
        + Send
        + Sync,
>;

/// Where the gate's lease stands.
#[derive(Clone, Debug, PartialEq, Eq)]
enum LeaseState {
    /// Not held, not asked for.
    Idle,
    /// Asked for; waiting in the broker's queue.
    Waiting,
    /// Held, with this fencing token.
    Held(u64),
    /// The last attempt failed (the broker refused or is unreachable).
    Failed(String),
}

struct Shared {
    settings: GateSettings,
    in_flight: watch::Sender<usize>,
    lease: watch::Sender<LeaseState>,
}

/// A request in flight, until dropped.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.in_flight.send_modify(|n| *n += 1);
        Self(Arc::clone(shared))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The headers a proxy must not forward (RFC 9110, 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Serves the gate on `listener` until `shutdown` resolves.
pub(crate) async fn serve(
    settings: GateSettings,
    listener: TcpListener,
    connect: Connect,
    shutdown: impl Future<Output = ()>,
) {
    let shared = Arc::new(Shared {
        settings,
        in_flight: watch::Sender::new(0),
        lease: watch::Sender::new(LeaseState::Idle),
    });
    let keeper = tokio::spawn(keep_lease(Arc::clone(&shared), connect));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, _) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, std::convert::Infallible>(handle(shared, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
    keeper.abort();
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let guard = InFlight::new(&shared);
    let mut lease = shared.lease.subscribe();
    let ready = lease.wait_for(|s| matches!(s, LeaseState::Held(_) | LeaseState::Failed(_)));
    let state = match shared.settings.max_wait {
        Some(limit) => match tokio::time::timeout(limit, ready).await {
            Ok(state) => state.map(|s| s.clone()),
            Err(_) => {
                let seconds = limit.as_secs_f64().ceil().max(1.0);
                return refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!(
                        "the GPU is busy: no lease for {} within {}",
                        shared.settings.consumer,
                        humantime::format_duration(limit)
                    ),
                    Some(seconds),
                );
            }
        },
        None => ready.await.map(|s| s.clone()),
    };
    let token = match state {
        Ok(LeaseState::Held(token)) => token,
        Ok(LeaseState::Failed(why)) => {
            return refusal(StatusCode::SERVICE_UNAVAILABLE, &why, Some(5.0));
        }
        _ => {
            return refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "the gate is stopping",
                None,
            );
        }
    };
    let waited_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    match forward(&shared.settings.upstream, request).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let headers = &mut parts.headers;
            headers.insert(
                HeaderName::from_static("x-gpulease-token"),
                HeaderValue::from(token),
            );
            headers.insert(
                HeaderName::from_static("x-gpulease-waited-ms"),
                HeaderValue::from(waited_ms),
            );
            let body = Guarded {
                inner: body,
                _guard: guard,
            };
            Response::from_parts(parts, body.boxed())
        }
        Err(why) => refusal(StatusCode::BAD_GATEWAY, &why, None),
    }
}

/// An answer of the gate's own, in the JSON shape ollama's clients read.
fn refusal(status: StatusCode, why: &str, retry_after: Option<f64>) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": why }).to_string();
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(seconds) = retry_after {
        // Whole seconds, as HTTP wants them.
        headers.insert(
            hyper::header::RETRY_AFTER,
            HeaderValue::from(seconds as u64),
        );
    }
    response
}

fn strip_hop_by_hop(headers: &mut hyper::HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|h| h.trim().to_ascii_lowercase()))
        .collect();
    for name in HOP_BY_HOP.iter().copied().map(str::to_owned).chain(named) {
        headers.remove(name.as_str());
    }
}

/// Sends `request` to `upstream` on a new connection, its body streamed.
async fn forward(upstream: &Uri, request: Request<Incoming>) -> Result<Response<Incoming>, String> {
    let authority = upstream
        .authority()
        .ok_or_else(|| format!("the upstream {upstream} has no host"))?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((authority.host(), port))
        .await
        .map_err(|e| format!("cannot reach the upstream {upstream}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("the upstream {upstream}: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let (mut parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = path
        .parse()
        .map_err(|e| format!("bad request path {path:?}: {e}"))?;
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
        parts.headers.insert(hyper::header::HOST, host);
    }
    sender
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(|e| format!("the upstream {upstream}: {e}"))
}

/// A response body that keeps its request in flight until it is dropped:
/// sent to the end, or abandoned by a client that went away.
struct Guarded {
    inner: Incoming,
    _guard: InFlight,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Holds one lease while requests are in flight (and `linger` after the
/// last), until the gate stops. Cancel-safe: dropping it drops the call,
/// which ends the lease or the wait.
async fn keep_lease(shared: Arc<Shared>, connect: Connect) {
    let mut in_flight = shared.in_flight.subscribe();
    loop {
        if in_flight.wait_for(|n| *n > 0).await.is_err() {
            return;
        }
        shared.lease.send_replace(LeaseState::Waiting);
        let outcome = hold_once(&shared, &connect, &mut in_flight).await;
        match outcome {
            Ok(()) => {
                shared.lease.send_replace(LeaseState::Idle);
            }
            Err(why) => {
                warn!(consumer = %shared.settings.consumer, error = %why, "no lease");
                shared.lease.send_replace(LeaseState::Failed(why));
                // Requests waiting now are answered; the next ones try again.
                tokio::time::sleep(Duration::from_millis(500)).await;
                shared.lease.send_replace(LeaseState::Idle);
            }
        }
    }
}

/// Why a held lease stops being the gate's: it was lost, or the broker
/// asked it to make way. Cancel-safe.
async fn lost_or_preempted(
    lease: &Lease,
    preempted: &mut mpsc::UnboundedReceiver<pb::PreemptRequested>,
) -> String {
    tokio::select! {
        lost = lease.lost() => lost.to_string(),
        Some(asked) = preempted.recv() => format!("asked to make way for {}", asked.for_consumer),
    }
}

/// One lease: asked for, held while requests are in flight and for the
/// linger after them, released.
async fn hold_once(
    shared: &Shared,
    connect: &Connect,
    in_flight: &mut watch::Receiver<usize>,
) -> Result<(), String> {
    let settings = &shared.settings;
    let client = connect().await?;
    // Asked to make way, the gate lets the lease go as if it were lost:
    // the requests in flight are not stopped, but the GPU is handed on.
    let (preempt_tx, mut preempted) = mpsc::unbounded_channel();
    let request = client
        .lease(&settings.consumer)
        .vram_mib(settings.vram_mib)
        .client_pid(std::process::id())
        .on_preempt_requested(move |asked| {
            let _ = preempt_tx.send(asked.clone());
        });
    // Wait for the grant, unless every waiting request gave up first.
    let lease = tokio::select! {
        lease = request.acquire() => lease.map_err(|e| match e {
            gpulease_client::Error::Status(status) => {
                format!("the broker refused the lease: {}", status.message())
            }
            other => other.to_string(),
        })?,
        idle = in_flight.wait_for(|n| *n == 0) => {
            drop(idle);
            // Nobody waits any more: dropping `acquire()` withdraws it.
            return Ok(());
        }
    };
    let token = lease.token();
    info!(consumer = %settings.consumer, token, "lease held");
    shared.lease.send_replace(LeaseState::Held(token));
    loop {
        let idle = tokio::select! {
            idle = in_flight.wait_for(|n| *n == 0) => idle.is_ok(),
            event = lost_or_preempted(&lease, &mut preempted) => {
                warn!(consumer = %settings.consumer, %event, "lease lost while requests were in flight");
                shared.lease.send_replace(LeaseState::Idle);
                return Ok(());
            }
        };
        if !idle {
            break;
        }
        {
            tokio::select! {
                () = tokio::time::sleep(settings.linger) => break,
                busy = in_flight.wait_for(|n| *n > 0) => {
                    if busy.is_err() {
                        break;
                    }
                }
                event = lost_or_preempted(&lease, &mut preempted) => {
                    warn!(consumer = %settings.consumer, %event, "lease lost while lingering");
                    return Ok(());
                }
            }
        }
    }
    shared.lease.send_replace(LeaseState::Idle);
    // The broker ends the call once it has the release.
    let _ = tokio::time::timeout(Duration::from_secs(2), lease.release()).await;
    info!(consumer = %settings.consumer, token, "lease released");
    Ok(())
}
