//! Prometheus metrics: the counters and histograms the broker updates as it
//! decides, the gauges read from a snapshot at scrape time, and the plain
//! HTTP listener that serves them at `/metrics`.
//!
//! Nothing here runs under the core's lock. Counters and histograms are
//! updated where the broker already writes its log lines, after the lock is
//! released; gauges (queue depth, memory, residents) are computed from the
//! same snapshot a `Status` call takes, only when Prometheus asks. A grant
//! therefore costs a few atomic increments more than before, and nothing
//! else.
//!
//! The exposition is the classic text format (`text/plain; version=0.0.4`),
//! which every Prometheus server and `promtool check metrics` read.
//!
//! Labels are bounded: `gpu` is a GPU index, `consumer` a configured
//! consumer's name (every consumer that is not configured is folded into
//! [`UNCONFIGURED`]), `reason`, `result` and `code` come from short fixed
//! lists, and the two `_info` gauges carry one series each per GPU (`uuid`,
//! `name`) and per build (`version`). No lease id, pid, token or free-form
//! label ever becomes a label.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{
    Encoder as _, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::broker::BrokerStatus;

/// The `consumer` label of every consumer that is not configured: a client
/// that invents a name per request must not create a time series per
/// request. No configured name can collide with it, since names may not
/// contain parentheses.
pub(crate) const UNCONFIGURED: &str = "(unconfigured)";

/// The content type of the exposition.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Buckets for waits and holds, in seconds: from a millisecond (a hand-over
/// on a free GPU) to four hours (a training run).
const LEASE_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0,
    14400.0,
];

/// Buckets for unloads, in seconds: from 10 ms to 10 minutes.
const UNLOAD_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 600.0,
];

const MIB: f64 = 1024.0 * 1024.0;

/// Log lines the log writer had to drop, counted by [`log_line_dropped`]:
/// a static, because logging is set up before any broker exists.
static LOG_LINES_DROPPED: AtomicU64 = AtomicU64::new(0);

/// Counts a log line the writer dropped (it could not be written in time);
/// exported as `gpulease_log_lines_dropped_total`.
pub(crate) fn log_line_dropped() {
    LOG_LINES_DROPPED.fetch_add(1, Ordering::Relaxed);
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Every metric of the broker, in one registry.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    /// The configured consumers' names, for [`Metrics::consumer`]; replaced
    /// on reload.
    configured: RwLock<HashSet<String>>,
    grants: IntCounterVec,
    lease_ends: IntCounterVec,
    unload_requests: IntCounterVec,
    acquire_rejections: IntCounterVec,
    log_lines_dropped: IntCounter,
    lease_wait: HistogramVec,
    lease_hold: HistogramVec,
    unload_duration: HistogramVec,
    gauges: Gauges,
    /// Scrapes reset and refill the gauges; one at a time.
    scrape: Mutex<()>,
}

#[derive(Debug)]
struct Gauges {
    queue_depth: IntGaugeVec,
    leases_held: IntGaugeVec,
    capacity: IntGaugeVec,
    oldest_waiter_age: GaugeVec,
    memory_total: GaugeVec,
    memory_free: GaugeVec,
    memory_promised: GaugeVec,
    resident_memory: GaugeVec,
    unleased_processes: IntGaugeVec,
    gpu_info: IntGaugeVec,
    build_info: IntGaugeVec,
    uptime: Gauge,
}

/// How an unload request ended, as the `result` label spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UnloadResult {
    /// The resident's memory came back (or it said it unloaded) in time.
    Unloaded,
    /// `gpu.unload_timeout` passed with the resident still there.
    Timeout,
    /// The adapter failed: the command exited non-zero, could not run, or
    /// was killed at the deadline.
    Error,
}

impl UnloadResult {
    fn label(self) -> &'static str {
        match self {
            Self::Unloaded => "unloaded",
            Self::Timeout => "timeout",
            Self::Error => "error",
        }
    }
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("registered once");
    metric
}

fn int_gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("registered once");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let metric = GaugeVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("registered once");
    metric
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    let metric = HistogramVec::new(opts, labels).expect("a valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("registered once");
    metric
}

impl Metrics {
    /// The metrics of a broker; see [`Metrics::configure`].
    pub(crate) fn new() -> Self {
        let r = Registry::new();
        let gauges = Gauges {
            queue_depth: int_gauge(
                &r,
                "gpulease_queue_depth",
                "Requests waiting for the GPU.",
                &["gpu"],
            ),
            leases_held: int_gauge(
                &r,
                "gpulease_leases_held",
                "Leases held on the GPU now.",
                &["gpu"],
            ),
            capacity: int_gauge(
                &r,
                "gpulease_capacity",
                "Leases the GPU may have held at once.",
                &["gpu"],
            ),
            oldest_waiter_age: gauge(
                &r,
                "gpulease_oldest_waiter_age_seconds",
                "How long the longest waiting request for the GPU has waited; 0 when none waits.",
                &["gpu"],
            ),
            memory_total: gauge(
                &r,
                "gpulease_gpu_memory_total_bytes",
                "The GPU's memory (NVML's reading, else the configured size; 0 when unknown).",
                &["gpu"],
            ),
            memory_free: gauge(
                &r,
                "gpulease_gpu_memory_free_bytes",
                "The GPU's free memory as NVML last read it (absent without NVML).",
                &["gpu"],
            ),
            memory_promised: gauge(
                &r,
                "gpulease_gpu_memory_promised_bytes",
                "Memory granted to holders that their processes have not allocated yet.",
                &["gpu"],
            ),
            resident_memory: gauge(
                &r,
                "gpulease_resident_memory_bytes",
                "Memory idle residents are believed to keep on the GPU.",
                &["gpu", "consumer"],
            ),
            unleased_processes: int_gauge(
                &r,
                "gpulease_unleased_processes",
                "Processes on the GPU that belong to no lease holder and no resident (NVML only).",
                &["gpu"],
            ),
            gpu_info: int_gauge(
                &r,
                "gpulease_gpu_info",
                "Always 1: the GPU's UUID and name, to join with the DCGM exporter's UUID label.",
                &["gpu", "uuid", "name"],
            ),
            build_info: int_gauge(
                &r,
                "gpulease_build_info",
                "Always 1: the broker's version.",
                &["version"],
            ),
            uptime: {
                let metric = Gauge::new(
                    "gpulease_uptime_seconds",
                    "How long the broker has been running.",
                )
                .expect("a valid metric");
                r.register(Box::new(metric.clone()))
                    .expect("registered once");
                metric
            },
        };
        let log_lines_dropped = IntCounter::new(
            "gpulease_log_lines_dropped_total",
            "Log lines dropped because the log could not be written in time.",
        )
        .expect("a valid metric");
        r.register(Box::new(log_lines_dropped.clone()))
            .expect("registered once");
        Self {
            grants: counter(
                &r,
                "gpulease_grants_total",
                "Leases granted.",
                &["gpu", "consumer"],
            ),
            lease_ends: counter(
                &r,
                "gpulease_lease_ends_total",
                "Held leases that ended, by how they ended.",
                &["gpu", "consumer", "reason"],
            ),
            unload_requests: counter(
                &r,
                "gpulease_unload_requests_total",
                "Idle residents asked to unload, by how it went.",
                &["gpu", "consumer", "result"],
            ),
            acquire_rejections: counter(
                &r,
                "gpulease_acquire_rejections_total",
                "AcquireLease calls refused before joining a queue, by gRPC status code.",
                &["code"],
            ),
            lease_wait: histogram(
                &r,
                "gpulease_lease_wait_seconds",
                "How long granted requests waited in the queue.",
                &["gpu", "consumer"],
                LEASE_BUCKETS,
            ),
            lease_hold: histogram(
                &r,
                "gpulease_lease_hold_seconds",
                "How long ended leases were held.",
                &["gpu", "consumer"],
                LEASE_BUCKETS,
            ),
            unload_duration: histogram(
                &r,
                "gpulease_unload_duration_seconds",
                "From asking an idle resident to unload until its memory came back.",
                &["consumer"],
                UNLOAD_BUCKETS,
            ),
            log_lines_dropped,
            gauges,
            registry: r,
            configured: RwLock::new(HashSet::new()),
            scrape: Mutex::new(()),
        }
    }

    /// Sets the configured consumers (at start, and on reload), each with
    /// whether it has an unload adapter, and starts at zero the series each
    /// will have on `gpus`: so that `rate()` and `increase()` see the first
    /// grant or the first failed unload, and dashboards have every series
    /// from the start. Series of consumers removed by a reload stay, frozen.
    pub(crate) fn configure(&self, consumers: &[(String, bool)], gpus: &[u32]) {
        *self
            .configured
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) =
            consumers.iter().map(|(name, _)| name.clone()).collect();
        for gpu in gpus {
            let gpu = gpu.to_string();
            for (consumer, unloads) in consumers {
                let labels = [gpu.as_str(), consumer.as_str()];
                self.grants.with_label_values(&labels);
                self.lease_wait.with_label_values(&labels);
                self.lease_hold.with_label_values(&labels);
                if *unloads {
                    for result in [
                        UnloadResult::Unloaded,
                        UnloadResult::Timeout,
                        UnloadResult::Error,
                    ] {
                        self.unload_requests.with_label_values(&[
                            gpu.as_str(),
                            consumer.as_str(),
                            result.label(),
                        ]);
                    }
                    self.unload_duration.with_label_values(&[consumer.as_str()]);
                }
            }
        }
        for code in [
            "INVALID_ARGUMENT",
            "PERMISSION_DENIED",
            "UNAUTHENTICATED",
            "RESOURCE_EXHAUSTED",
            "UNAVAILABLE",
        ] {
            self.acquire_rejections.with_label_values(&[code]);
        }
    }

    /// The `consumer` label for `name`: itself if configured, else
    /// [`UNCONFIGURED`].
    pub(crate) fn consumer<'a>(&self, name: &'a str) -> &'a str {
        let configured = self
            .configured
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if configured.contains(name) {
            name
        } else {
            UNCONFIGURED
        }
    }

    /// A lease was granted on `gpu` to `consumer` after `waited`.
    pub(crate) fn granted(&self, gpu: u32, consumer: &str, waited: Duration) {
        let gpu = gpu.to_string();
        let labels = [gpu.as_str(), self.consumer(consumer)];
        self.grants.with_label_values(&labels).inc();
        self.lease_wait
            .with_label_values(&labels)
            .observe(waited.as_secs_f64());
    }

    /// A lease of `consumer` on `gpu` ended (`reason`, see
    /// `broker::end_name`) after being held for `held`.
    pub(crate) fn ended(&self, gpu: u32, consumer: &str, reason: &str, held: Duration) {
        let gpu = gpu.to_string();
        let consumer = self.consumer(consumer);
        self.lease_ends
            .with_label_values(&[gpu.as_str(), consumer, reason])
            .inc();
        self.lease_hold
            .with_label_values(&[gpu.as_str(), consumer])
            .observe(held.as_secs_f64());
    }

    /// An unload request to `consumer` on `gpu` ended with `result`;
    /// `took` is how long its memory took to come back, when it did.
    pub(crate) fn unload(
        &self,
        gpu: u32,
        consumer: &str,
        result: UnloadResult,
        took: Option<Duration>,
    ) {
        let gpu = gpu.to_string();
        let consumer = self.consumer(consumer);
        self.unload_requests
            .with_label_values(&[gpu.as_str(), consumer, result.label()])
            .inc();
        if let Some(took) = took {
            self.unload_duration
                .with_label_values(&[consumer])
                .observe(took.as_secs_f64());
        }
    }

    /// An `AcquireLease` call was refused with `code` before it joined a
    /// queue.
    pub(crate) fn rejected(&self, code: tonic::Code) {
        self.acquire_rejections
            .with_label_values(&[code_name(code)])
            .inc();
    }

    /// The exposition: the gauges filled from `status`, then every metric
    /// in the text format.
    pub(crate) fn render(&self, status: &BrokerStatus) -> String {
        let _one_at_a_time = self
            .scrape
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let g = &self.gauges;
        for vec in [&g.queue_depth, &g.leases_held, &g.capacity] {
            vec.reset();
        }
        g.unleased_processes.reset();
        g.gpu_info.reset();
        g.build_info.reset();
        for vec in [
            &g.oldest_waiter_age,
            &g.memory_total,
            &g.memory_free,
            &g.memory_promised,
            &g.resident_memory,
        ] {
            vec.reset();
        }
        g.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        g.uptime.set(status.uptime.as_secs_f64());
        let dropped = LOG_LINES_DROPPED.load(Ordering::Relaxed);
        let counted = self.log_lines_dropped.get();
        if dropped > counted {
            self.log_lines_dropped.inc_by(dropped - counted);
        }
        for gpu in &status.core.gpus {
            let index = gpu.spec.index.to_string();
            let label = [index.as_str()];
            g.queue_depth
                .with_label_values(&label)
                .set(i64::try_from(gpu.queue_depth).unwrap_or(i64::MAX));
            g.leases_held
                .with_label_values(&label)
                .set(i64::try_from(gpu.holders.len()).unwrap_or(i64::MAX));
            g.capacity
                .with_label_values(&label)
                .set(i64::from(status.core.capacity_per_gpu));
            g.oldest_waiter_age
                .with_label_values(&label)
                .set(gpu.oldest_waiting.as_secs_f64());
            let total = gpu
                .reading
                .as_ref()
                .map_or(gpu.spec.total_mib, |r| r.total_mib);
            g.memory_total
                .with_label_values(&label)
                .set(total as f64 * MIB);
            let observed = |pid: u32| -> u64 {
                gpu.reading.as_ref().map_or(0, |r| {
                    r.processes
                        .iter()
                        .filter(|p| p.belongs_to(pid))
                        .map(|p| p.used_mib)
                        .sum()
                })
            };
            if let Some(reading) = &gpu.reading {
                g.memory_free
                    .with_label_values(&label)
                    .set(reading.free_mib as f64 * MIB);
                g.unleased_processes
                    .with_label_values(&label)
                    .set(i64::try_from(gpu.unleased.len()).unwrap_or(i64::MAX));
            }
            // As admission counts it: what holders asked for, less what
            // their processes were seen to allocate (with readings), or all
            // of it (without).
            let promised: u64 = gpu
                .holders
                .iter()
                .map(|h| {
                    h.request
                        .vram_mib
                        .saturating_sub(observed(h.request.client_pid))
                })
                .sum();
            g.memory_promised
                .with_label_values(&label)
                .set(promised as f64 * MIB);
            for resident in &gpu.residents {
                let consumer = self.consumer(&resident.resident.consumer);
                g.resident_memory
                    .with_label_values(&[index.as_str(), consumer])
                    .add(resident.resident.footprint_mib as f64 * MIB);
            }
            g.gpu_info
                .with_label_values(&[index.as_str(), &gpu.spec.uuid, &gpu.spec.name])
                .set(1);
        }
        let mut buffer = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            warn!(error = %e, "cannot encode the metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// The canonical name of a gRPC status code, as the `code` label spells it.
pub(crate) fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// What the HTTP listener serves: a fresh exposition per request.
pub(crate) type Exposition = Arc<dyn Fn() -> String + Send + Sync>;

/// Connections the metrics listener serves at once; more are closed at
/// once. Prometheus needs one per server that scrapes.
const MAX_CONNECTIONS: usize = 64;

/// How long a client may take to send its request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` on `listener` until `stop` is cancelled: plain
/// HTTP/1.1, one task per connection, at most [`MAX_CONNECTIONS`] at once,
/// each with [`HEADER_TIMEOUT`] to say what it wants. Anything else is 404
/// (or 405 for a method other than GET and HEAD).
pub(crate) async fn serve(listener: TcpListener, exposition: Exposition, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, usually: do not spin.
                    warn!(error = %e, "metrics listener cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(%peer, "too many metrics connections; closing this one");
            continue;
        };
        let exposition = Arc::clone(&exposition);
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let exposition = Arc::clone(&exposition);
                async move { Ok::<_, Infallible>(answer(&request, &exposition)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = connection => if let Err(e) = result {
                    debug!(%peer, error = %e, "metrics connection ended with an error");
                },
                () = stop.cancelled() => {}
            }
        });
    }
}

fn answer(request: &Request<Incoming>, exposition: &Exposition) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET and HEAD\n".to_owned(),
        );
    }
    match request.uri().path() {
        "/metrics" => reply(StatusCode::OK, CONTENT_TYPE, exposition()),
        "/" => reply(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "gpulease: the metrics are at /metrics\n".to_owned(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found; the metrics are at /metrics\n".to_owned(),
        ),
    }
}

/// The address a metrics listener reports, as a URL.
pub(crate) fn url(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}
