//! `gpulease gate`: the HTTP gate's command line. Flags first, then the
//! `[gate]` section of `--config FILE` (the broker's own file will do), so
//! that a systemd unit runs it in one line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::exit::Failure;
use super::{BrokerArg, ExitCode, parse_duration};
use crate::config::{Config, check_upstream};
use crate::gate::{Connect, GateSettings};
use gpulease_client::DEFAULT_BROKER;

/// How long the lease is kept after the last request, unless told.
const DEFAULT_LINGER: Duration = Duration::from_secs(10);

/// Options of `gpulease gate`.
#[derive(Debug, Args)]
pub(crate) struct GateArgs {
    #[command(flatten)]
    broker: BrokerArg,
    /// The consumer the gate's leases are for.
    #[arg(long)]
    consumer: Option<String>,
    /// Where to listen for HTTP, e.g. 127.0.0.1:11435.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// The server to forward to, e.g. http://127.0.0.1:11434.
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// GPU memory a request needs, in MiB (0 = unknown).
    #[arg(long, value_name = "MIB")]
    vram_mib: Option<u64>,
    /// Answer 503 with Retry-After when the lease has not come within this time (e.g. 30s).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    max_wait: Option<Duration>,
    /// Keep the lease this long after the last request ends (default 10s).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    linger: Option<Duration>,
    /// A TOML file whose [gate] section gives the defaults of these flags (the broker's file will do).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

pub(super) async fn gate(mut args: GateArgs) -> Result<ExitCode, Failure> {
    let usage = |message: String| Failure::new(ExitCode::USAGE, message);
    let file = match &args.config {
        Some(path) => Some(
            Config::load(Some(path), Some(std::collections::HashMap::new()))
                .map_err(|e| usage(format!("invalid configuration: {e}")))?,
        ),
        None => None,
    };
    let section = file.as_ref().map(|c| c.gate.clone()).unwrap_or_default();
    let consumer = args
        .consumer
        .or(section.consumer)
        .ok_or_else(|| usage("--consumer is required (or [gate] consumer)".into()))?;
    crate::core::validate_consumer_name(&consumer)
        .map_err(|e| usage(format!("--consumer: {e}")))?;
    let listen = args
        .listen
        .or(section.listen)
        .ok_or_else(|| usage("--listen is required (or [gate] listen)".into()))?;
    let upstream = args
        .upstream
        .or(section.upstream)
        .ok_or_else(|| usage("--upstream is required (or [gate] upstream)".into()))?;
    check_upstream(&upstream).map_err(|e| usage(format!("--upstream: {e}")))?;
    let settings = GateSettings {
        consumer,
        listen,
        upstream: upstream
            .parse()
            .map_err(|e| usage(format!("--upstream: {e}")))?,
        vram_mib: args.vram_mib.or(section.vram_mib).unwrap_or(0),
        max_wait: args.max_wait.or(section.max_wait).filter(|d| !d.is_zero()),
        linger: args.linger.or(section.linger).unwrap_or(DEFAULT_LINGER),
    };
    // The broker: the flag, else the file's [gate] broker, else the broker
    // the same file configures.
    if args.broker.broker == DEFAULT_BROKER
        && let Some(config) = &file
    {
        let own = config
            .socket
            .as_ref()
            .map(|path| format!("unix:{}", path.display()))
            .or_else(|| config.listen.map(|addr| addr.to_string()));
        if let Some(broker) = section.broker.clone().or(own) {
            args.broker.broker = broker;
        }
    }
    if let Some(file) = section.token_file {
        args.broker.set_token_file(file);
    }
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| {
            Failure::new(
                ExitCode::UNAVAILABLE,
                format!("cannot listen on {}: {e}", settings.listen),
            )
        })?;
    let address = listener
        .local_addr()
        .map_err(|e| Failure::new(ExitCode::UNAVAILABLE, format!("cannot listen: {e}")))?;
    let broker = Arc::new(args.broker);
    let connect: Connect = Arc::new(move || {
        let broker = Arc::clone(&broker);
        Box::pin(async move { broker.connect().await.map_err(|f| f.message) })
    });
    tracing::info!(%address, consumer = %settings.consumer, upstream = %settings.upstream, "gate listening");
    // The readiness line, as `gpulease serve` prints it.
    println!("listening on {address}");
    let shutdown = async {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut interrupt), Ok(mut terminate)) => {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    };
    crate::gate::serve(settings, listener, connect, shutdown).await;
    Ok(ExitCode::OK)
}
