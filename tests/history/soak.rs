//! The soak (opt-in): ten thousand queued waiters with churn for minutes.
//!
//! Every waiter is an in-process call on one of a hundred connections. The
//! head of the queue is granted, holds for a moment, releases and joins the
//! back again; meanwhile waiters cancel at random moments and join again
//! (churn). The broker's resident memory is sampled throughout. Then every
//! call is dropped, and the broker must be idle (no permit, no queue slot)
//! with its memory back near where it started. Two shorter rounds follow:
//! memory that a leak would keep growing must not grow from the second to
//! the third. The history of the whole soak goes through the checker.

use std::sync::Arc;
use std::time::Duration;

use gpulease_client::pb::v1 as pb;
use gpulease_client::pb::v1::lease_broker_client::LeaseBrokerClient;
use gpulease_client::pb::v1::lease_event::Kind as EventKind;
use gpulease_client::pb::v1::lease_request::Kind as RequestKind;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::broker::{self, BrokerLog, BrokerProcess, Settings};
use crate::checker::{self, Instance};
use crate::history::{self, ClientKind, Ev, Recorder};
use crate::rng::Rng;
use crate::worker;
use gpulease_testkit::clock::nanos;

/// Calls per connection.
const STREAMS_PER_CONNECTION: usize = 100;

/// The soak's knobs, from the environment.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Knobs {
    /// Waiters (`GPULEASE_SOAK_WAITERS`, default 10,000).
    pub(crate) waiters: usize,
    /// Churn time of the first round (`GPULEASE_SOAK_SECS`, default 180).
    pub(crate) churn: Duration,
    /// How many consumer names the waiters share (`GPULEASE_SOAK_NAMES`);
    /// 0 (the default) gives every call a name of its own, which the history
    /// checker needs and which also stresses the broker's consumer book.
    pub(crate) names: usize,
}

impl Knobs {
    /// Reads the knobs.
    pub(crate) fn from_env() -> Self {
        let number = |key: &str, default: u64| {
            std::env::var(key)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Self {
            waiters: usize::try_from(number("GPULEASE_SOAK_WAITERS", 10_000)).unwrap_or(10_000),
            churn: Duration::from_secs(number("GPULEASE_SOAK_SECS", 180)),
            names: usize::try_from(number("GPULEASE_SOAK_NAMES", 0)).unwrap_or(0),
        }
    }
}

struct Round {
    /// Where calls are recorded; `None` when names are shared.
    recorder: Option<Recorder>,
    names: usize,
    stop: CancellationToken,
    next: std::sync::atomic::AtomicU64,
}

/// Runs the soak; its figures, or what failed.
pub(crate) async fn run(
    knobs: Knobs,
    seed: u64,
    artifacts: &std::path::Path,
) -> Result<Vec<String>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let settings = Settings {
        env: vec![
            ("GPULEASE__CAPACITY".into(), "1".into()),
            ("GPULEASE__KEEPALIVE__INTERVAL".into(), "2s".into()),
            ("GPULEASE__KEEPALIVE__TIMEOUT".into(), "2s".into()),
        ],
        state_dir: dir.path().join("state"),
        dir: dir.path().to_path_buf(),
    };
    let log = BrokerLog::default();
    let mut process = BrokerProcess::start(&settings, 1, &log).await?;
    let addr = process.addr.clone();
    let recorder = Recorder::memory();
    let mut rng = Rng::new(seed);
    let mut figures = vec![
        format!("seed: {seed}"),
        format!(
            "waiters: {}, churn: {} s, consumer names: {}",
            knobs.waiters,
            knobs.churn.as_secs(),
            if knobs.names == 0 {
                "one per call".to_owned()
            } else {
                knobs.names.to_string()
            }
        ),
    ];
    let mut failures = Vec::new();

    let baseline = process.rss_kib().unwrap_or(0);
    let mut after = Vec::new();
    let mut peak = baseline;
    let mut rounds = 0;
    for churn in [knobs.churn, knobs.churn / 4, knobs.churn / 4] {
        rounds += 1;
        let connections = connect_all(&addr, knobs.waiters).await?;
        let round = Arc::new(Round {
            recorder: (knobs.names == 0).then(|| recorder.clone()),
            names: knobs.names,
            stop: CancellationToken::new(),
            next: std::sync::atomic::AtomicU64::new(0),
        });
        let mut tasks = JoinSet::new();
        for i in 0..knobs.waiters {
            let client = connections[i / STREAMS_PER_CONNECTION].clone();
            tasks.spawn(waiter(
                Arc::clone(&round),
                client,
                rounds * 1_000_000 + i,
                rng.fork(),
            ));
        }
        let filled = broker::wait_for(&addr, Duration::from_secs(300), |s| {
            s.queue_depth as usize + 50 >= knobs.waiters
        })
        .await;
        if let Err(last) = filled {
            failures.push(format!("round {rounds}: the queue never filled: {last}"));
        }
        let full = process.rss_kib().unwrap_or(0);
        let deadline = tokio::time::Instant::now() + churn;
        let mut depth_low = u32::MAX;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(5)).await;
            peak = peak.max(process.rss_kib().unwrap_or(0));
            if let Ok(status) = broker::status(&addr).await {
                depth_low = depth_low.min(status.queue_depth);
            }
        }
        round.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(120), tasks.join_all()).await;
        drop(connections);
        if let Err(e) = broker::wait_idle(&addr, Duration::from_secs(120)).await {
            failures.push(format!("round {rounds}: {e}"));
        }
        // Let the allocator settle: the broker is idle, nothing else runs.
        // jemalloc's background threads return freed pages over its decay
        // time (10 s), so watch RSS fall for up to three times that.
        let settle_until = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut rss = process.rss_kib().unwrap_or(0);
        let mut settled = rss;
        while tokio::time::Instant::now() < settle_until {
            tokio::time::sleep(Duration::from_secs(1)).await;
            rss = process.rss_kib().unwrap_or(0);
            if rss + 1024 >= settled && rss < full / 2 {
                break;
            }
            settled = settled.min(rss);
        }
        after.push(rss);
        figures.push(format!(
            "round {rounds}: RSS {full} KiB with the queue full, {rss} KiB once drained ({} open fds); queue depth never below {depth_low} while churning",
            process.open_fds().unwrap_or(0)
        ));
    }
    let status = broker::status(&addr).await?;
    figures.push(format!(
        "broker RSS: baseline {baseline} KiB, peak {peak} KiB, after the rounds {after:?} KiB"
    ));
    let ended = status.ended.unwrap_or_default();
    figures.push(format!(
        "grants {}, released {}, withdrawn {}, disconnected {}",
        status.total_grants, ended.released, ended.withdrawn, ended.disconnected
    ));
    figures.push(format!(
        "kept by the idle broker: {} consumers, {} residents",
        status.consumers.len(),
        status.gpus.iter().map(|g| g.residents.len()).sum::<usize>()
    ));
    // Memory back near the baseline: at most the baseline plus a quarter of
    // the peak's growth (the allocator keeps some), and no growth from the
    // first round to the second (a leak would grow with every round).
    let allowed = baseline + (peak.saturating_sub(baseline)) / 4 + 8 * 1024;
    if let Some(&last) = after.last()
        && last > allowed
    {
        failures.push(format!(
            "broker RSS {last} KiB after draining; baseline {baseline} KiB, allowed {allowed} KiB"
        ));
    }
    if let [_, second, third] = after[..]
        && third > second + second / 10 + 8 * 1024
    {
        failures.push(format!(
            "broker RSS grew from {second} KiB to {third} KiB between two drained rounds: a leak"
        ));
    }
    if !process.alive() {
        failures.push("the broker died".into());
    }
    let _ = process.terminate().await;

    // Calls can be told apart in the broker's log only by their names.
    let report = (knobs.names == 0).then(|| {
        let ops = history::fold(recorder.entries());
        let lines = log.lines();
        checker::check(&checker::Inputs {
            ops: &ops,
            log: &lines,
            instances: &[Instance {
                instance: 1,
                killed_at: None,
            }],
            capacity: 1,
            bound: nanos(Duration::from_secs(4)),
            slack: nanos(Duration::from_secs(2)),
            counter: None,
        })
    });
    let _ = std::fs::create_dir_all(artifacts);
    let (checked, violations) = report.map_or_else(
        || {
            (
                vec!["history not checked: consumer names are shared".to_owned()],
                Vec::new(),
            )
        },
        |r| (r.figure_lines(), r.violations),
    );
    let _ = std::fs::write(
        artifacts.join("report.txt"),
        format!(
            "{}\n{}\n\nviolations:\n{}\n",
            figures.join("\n"),
            checked.join("\n"),
            violations.join("\n")
        ),
    );
    figures.extend(checked);
    failures.extend(violations.into_iter().take(20));
    if failures.is_empty() {
        Ok(figures)
    } else {
        Err(format!("{}\n{}", failures.join("\n"), figures.join("\n")))
    }
}

async fn connect_all(
    addr: &str,
    waiters: usize,
) -> Result<Vec<LeaseBrokerClient<Channel>>, String> {
    let mut connections = Vec::new();
    for _ in 0..waiters.div_ceil(STREAMS_PER_CONNECTION) {
        connections.push(broker::connect(addr).await?);
    }
    Ok(connections)
}

/// One waiter: joins the queue, holds briefly when granted, releases and
/// joins again; sometimes cancels while waiting and joins again.
async fn waiter(
    round: Arc<Round>,
    mut client: LeaseBrokerClient<Channel>,
    id: usize,
    mut rng: Rng,
) {
    while !round.stop.is_cancelled() {
        let n = round
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let op = if round.names > 0 {
            format!("s{}", id % round.names)
        } else {
            format!("s{id}-{n}")
        };
        let record = |ev: Ev| {
            if let Some(recorder) = &round.recorder {
                recorder.record(&op, ev);
            }
        };
        record(Ev::Invoke {
            instance: 1,
            pid: 0,
            max_wait_ms: 0,
            client: ClientKind::InProcess,
        });
        let (tx, rx) = mpsc::channel(2);
        let _ = tx
            .send(pb::LeaseRequest {
                kind: Some(RequestKind::Acquire(pb::Acquire {
                    consumer: op.clone(),
                    ..pb::Acquire::default()
                })),
            })
            .await;
        let mut events = match client.acquire_lease(ReceiverStream::new(rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                record(Ev::Ended {
                    code: worker::code_name(&status),
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let cancel = rng
            .chance(0.3)
            .then(|| Duration::from_millis(rng.range(0, 60_000)));
        let mut first = true;
        let granted = loop {
            tokio::select! {
                message = events.message() => match message {
                    Ok(Some(event)) => {
                        if std::mem::take(&mut first) {
                            record(Ev::FirstEvent);
                        }
                        if let Some(EventKind::Granted(g)) = event.kind {
                            record(Ev::Granted {
                                token: g.fencing_token,
                                lease_id: g.lease_id,
                                epoch: g.broker_epoch,
                            });
                            break true;
                        }
                    }
                    Ok(None) => {
                        record(Ev::Ended { code: "ok".into() });
                        break false;
                    }
                    Err(status) => {
                        record(Ev::Ended { code: worker::code_name(&status) });
                        break false;
                    }
                },
                () = sleep(cancel) => {
                    record(Ev::Dropped);
                    break false;
                }
                () = round.stop.cancelled() => {
                    record(Ev::Dropped);
                    return;
                }
            }
        };
        if !granted {
            continue;
        }
        tokio::time::sleep(Duration::from_millis(rng.range(0, 3))).await;
        record(Ev::ReleaseSent);
        let _ = tx
            .send(pb::LeaseRequest {
                kind: Some(RequestKind::Release(pb::Release {})),
            })
            .await;
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match events.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return "ok".to_owned(),
                    Err(status) => return worker::code_name(&status),
                }
            }
        })
        .await
        .unwrap_or_else(|_| "no_end".to_owned());
        record(Ev::Ended { code: end });
    }
}

async fn sleep(after: Option<Duration>) {
    match after {
        Some(after) => tokio::time::sleep(after).await,
        None => std::future::pending().await,
    }
}
