//! `gpulease serve`: binds the listeners, serves the lease broker with
//! health checking and reflection, and shuts down gracefully.
//!
//! [`bind`] and [`serve`] are separate so that a caller can bind
//! `127.0.0.1:0`, learn the port, and only then serve: nobody ever has to
//! sleep to "let the server start".

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::time::Duration;
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use tokio_rustls::TlsAcceptor;
use tonic::transport::Server;
use tracing::{info, warn};

use crate::auth::Authority;
use crate::broker::{Broker, Claim};
use crate::config::Config;
use crate::grpc::LeaseService;
use crate::incoming::HANDSHAKE_TIMEOUT;
use crate::inventory::Inventory;
use crate::reload::Reloader;
use crate::state::StateFile;

/// After every stream has ended at shutdown, how long connections get to
/// close once told to (GOAWAY). Idle connections are not waited for any
/// longer than this.
const FLUSH_GRACE: Duration = Duration::from_millis(250);

/// After every stream has ended at shutdown, how long before the GOAWAY, so
/// that the streams' last frames leave first.
const LAST_FRAMES: Duration = Duration::from_millis(50);

/// The broker's listeners, bound but not yet serving.
#[derive(Debug)]
pub(crate) struct Listeners {
    tcp: Option<TcpListener>,
    unix: Option<(UnixListener, PathBuf)>,
    metrics: Option<TcpListener>,
}

/// Why the broker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServeError {
    /// A listener could not be bound.
    #[error("cannot listen on {what}: {source}")]
    Bind {
        /// The address or path.
        what: String,
        /// Why.
        source: io::Error,
    },
    /// The TLS files could not be used (they changed after the
    /// configuration was loaded).
    #[error("TLS: {0}")]
    Tls(#[from] crate::config::ConfigError),
    /// The reflection service could not be built.
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A server failed while serving.
    #[error("serving failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl Listeners {
    /// The TCP address actually bound (with the real port for `:0`).
    pub(crate) fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The Unix socket's path.
    pub(crate) fn socket_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|(_, path)| path.as_path())
    }

    /// The metrics listener's address, if metrics are served.
    pub(crate) fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Every bound address, as a client's `--broker` spells it.
    pub(crate) fn addresses(&self) -> Vec<String> {
        let tcp = self.tcp_addr().map(|addr| addr.to_string());
        let unix = self
            .socket_path()
            .map(|path| format!("unix:{}", path.display()));
        tcp.into_iter().chain(unix).collect()
    }
}

/// Binds the listeners that `config` names.
///
/// A socket file left behind by a broker that is gone is replaced; one that
/// a live broker still answers on is an error, as is any other file there.
pub(crate) async fn bind(config: &Config) -> Result<Listeners, ServeError> {
    let tcp = match config.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind {
                    what: addr.to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    let unix = match &config.socket {
        Some(path) => {
            let bind_error = |source| ServeError::Bind {
                what: path.display().to_string(),
                source,
            };
            remove_stale_socket(path).await.map_err(bind_error)?;
            let listener = UnixListener::bind(path).map_err(bind_error)?;
            std::fs::set_permissions(
                path,
                std::fs::Permissions::from_mode(config.auth.socket_mode),
            )
            .map_err(bind_error)?;
            // Resolved when the configuration was loaded: a group that does
            // not exist never gets this far.
            if let Some(group) = &config.auth.socket_group {
                let gid = nix::unistd::Gid::from_raw(group.gid);
                nix::unistd::chown(path, None, Some(gid))
                    .map_err(|e| bind_error(io::Error::from(e)))?;
            }
            Some((listener, path.clone()))
        }
        None => None,
    };
    let metrics = match config.metrics.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind {
                    what: format!("{addr} (metrics.listen)"),
                    source,
                })?,
        ),
        None => None,
    };
    Ok(Listeners { tcp, unix, metrics })
}

async fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !metadata.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file that is not a socket is in the way",
        ));
    }
    if UnixStream::connect(path).await.is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another broker is answering on this socket",
        ));
    }
    info!(path = %path.display(), "replacing a stale socket file");
    std::fs::remove_file(path)
}

/// Serves the broker over `inventory`, with the tokens claimed in `state`,
/// on `listeners` until `shutdown` resolves, then shuts
/// down: refuses new requests, revokes every lease (`Revoked{SHUTDOWN}`),
/// ends every waiter with `UNAVAILABLE`, and waits up to
/// `config.shutdown_grace` for the streams to end. Each signal from
/// `hangups` (SIGHUP, installed by the caller before it binds) reloads the
/// configuration, as the `Reload` call does.
pub(crate) async fn serve(
    config: &Config,
    inventory: Arc<dyn Inventory>,
    state: (StateFile, Claim),
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    hangups: Option<tokio::signal::unix::Signal>,
) -> Result<(), ServeError> {
    let broker = Broker::start(config, inventory, state.0, state.1);
    let authority = Arc::new(Authority::new(&config.auth, &config.consumers));
    let reloader = Arc::new(Reloader::new(
        config.clone(),
        Arc::clone(&broker),
        Arc::clone(&authority),
    ));
    let limits = config.limits;
    let max_message = usize::try_from(limits.max_message_bytes).unwrap_or(usize::MAX);
    let service = LeaseService::new(Arc::clone(&broker), Arc::clone(&authority))
        .with_reloader(Arc::clone(&reloader));
    let (routes, health) =
        crate::grpc::routes(service, Arc::clone(&authority), max_message).await?;

    let router = || -> Result<_, ServeError> {
        let builder = Server::builder();
        // tonic refuses an oversized unary request before any handler
        // runs, with OUT_OF_RANGE; the broker's answer is RESOURCE_EXHAUSTED.
        let too_large = tower::util::MapResponseLayer::new(
            move |response: tonic::codegen::http::Response<tonic::body::Body>| {
                crate::grpc::rewrite_too_large(response, limits.max_message_bytes)
            },
        );
        Ok(builder
            .http2_keepalive_interval(Some(config.keepalive_interval))
            .http2_keepalive_timeout(Some(config.keepalive_timeout))
            .max_concurrent_streams(Some(limits.max_streams_per_connection))
            .layer(too_large)
            .add_routes(routes.clone()))
    };

    let stop = CancellationToken::new();
    let accepting = CancellationToken::new();
    let mut servers = JoinSet::new();
    let socket_path = listeners.socket_path().map(Path::to_path_buf);
    if let Some(listener) = listeners.tcp {
        let stop = stop.clone();
        let done = stop.clone().cancelled_owned();
        match tls(config)? {
            Some(acceptor) => {
                // The TLS handshake and the HTTP/2 preface share one deadline.
                let incoming = crate::incoming::incoming_tls(
                    listener,
                    acceptor,
                    HANDSHAKE_TIMEOUT,
                    accepting.clone(),
                );
                servers.spawn(router()?.serve_with_incoming_shutdown(incoming, done));
            }
            None => {
                // Registered, so that a call can find the process behind its
                // connection (`peer`).
                let listener = authority.connections().listener(listener);
                let incoming =
                    crate::incoming::incoming(listener, Some(HANDSHAKE_TIMEOUT), accepting.clone());
                servers.spawn(router()?.serve_with_incoming_shutdown(incoming, done));
            }
        }
    }
    if let Some((listener, _)) = listeners.unix {
        let incoming =
            crate::incoming::incoming(listener, Some(HANDSHAKE_TIMEOUT), accepting.clone());
        let stop = stop.clone();
        // Local peers prove who they are by their credentials, not TLS.
        let server = router()?.serve_with_incoming_shutdown(incoming, stop.cancelled_owned());
        servers.spawn(server);
    }

    if let Some(listener) = listeners.metrics {
        let this = Arc::clone(&broker);
        let exposition: crate::metrics::Exposition = Arc::new(move || this.exposition());
        tokio::spawn(crate::metrics::serve(listener, exposition, stop.clone()));
    }

    if let Some(hangups) = hangups {
        tokio::spawn(reload_on_hangup(hangups, reloader, stop.clone()));
    }

    // Every listener is bound and served: tell the service manager.
    crate::notify::ready(&broker);
    tokio::spawn(crate::notify::keep_informed(
        Arc::clone(&broker),
        stop.clone(),
    ));

    // Serve until asked to stop, or until a server fails.
    let failed = tokio::select! {
        () = shutdown => None,
        Some(result) = servers.join_next() => Some(result),
    };
    info!("shutting down");
    crate::notify::stopping();
    health.not_serving().await;
    accepting.cancel();
    broker.shut_down();
    // Every stream has been told to end. Wait until each has sent its last
    // word (`revoked`, the status) and tonic has finished its response,
    // and only then close the connections: HTTP/2 clients such as Python's
    // h2 (under grpclib) reject what follows a GOAWAY, so a `revoked` sent
    // after it would be lost to them.
    let deadline = tokio::time::Instant::now() + config.shutdown_grace;
    let streams_ended = tokio::time::timeout_at(deadline, broker.sessions_ended())
        .await
        .is_ok();
    if !streams_ended {
        warn!(
            grace = %humantime::format_duration(config.shutdown_grace),
            "streams still open after the shutdown grace period; closing them"
        );
    }
    // The last frames are queued on their connections; let them go out
    // ahead of the GOAWAY.
    tokio::time::sleep(LAST_FRAMES).await;
    stop.cancel();
    let flush = tokio::time::Instant::now() + FLUSH_GRACE;
    let _ = tokio::time::timeout_at(flush, async {
        while let Some(result) = servers.join_next().await {
            if let Ok(Err(e)) = result {
                warn!(error = %e, "server ended with an error");
            }
        }
    })
    .await;
    servers.abort_all();
    if let Some(path) = socket_path {
        let _ = std::fs::remove_file(path);
    }
    match failed {
        Some(Ok(Err(e))) => Err(e.into()),
        _ => Ok(()),
    }
}

/// Reloads the configuration on every SIGHUP until `stop`. A SIGHUP during
/// shutdown does nothing (the handler stays installed, so it cannot kill
/// the broker either).
async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    reloader: Arc<Reloader>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            received = hangups.recv() => if received.is_none() { return },
            () = stop.cancelled() => return,
        }
        info!("SIGHUP received; reloading the configuration");
        let reloader = Arc::clone(&reloader);
        // The outcome is logged by the reload itself.
        let _ = tokio::task::spawn_blocking(move || reloader.reload()).await;
    }
}

/// Raises the soft limit on open files to the hard limit, so that a burst
/// of connections meets the limit the administrator set rather than the
/// shell's default (often 1,024). Returns the limit now in force, and the
/// one before when it was raised.
pub(crate) fn raise_open_file_limit() -> io::Result<(u64, Option<u64>)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft >= hard {
        return Ok((soft, None));
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    Ok((hard, Some(soft)))
}

/// The TLS acceptor of the TCP listener, if configured. The files were
/// checked when the configuration was loaded; they are read again here, by
/// the same function, so a file changed since then says what is wrong in
/// the same words. The broker runs the TLS handshake itself (not tonic), so
/// that the HTTP/2 preface deadline can be applied inside the TLS stream
/// too.
fn tls(config: &Config) -> Result<Option<TlsAcceptor>, ServeError> {
    let Some(files) = &config.auth.tls else {
        return Ok(None);
    };
    let server = crate::tls::server_config(files)?;
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}
