//! Careless and hostile inputs: a lost or blocked log reader, a panic, stray
//! signals, damaged state files, oversized labels and messages, floods of
//! waiters, streams and connections, and Residency impostors. Each test is
//! one row of the table "careless and hostile inputs" in RELIABILITY.md.

use std::os::unix::process::ExitStatusExt as _;
use std::process::{Command as StdCommand, Stdio};
use std::time::Duration;

use gpulease_client::pb::v1 as pb;
use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::support::{BIN, Broker, Call, Options, PATIENCE, Stderr, acquire, signal};

/// Grants and releases `n` leases, one after the other.
async fn cycle(broker: &Broker, n: usize) {
    let client = broker.client().await;
    for i in 0..n {
        let mut call = Call::open_with_client(client.clone(), acquire(&format!("c{}", i % 8)))
            .await
            .unwrap();
        call.granted().await;
        call.release().await;
    }
}

fn dropped(status: &pb::StatusResponse) -> u64 {
    status.broker.as_ref().unwrap().log_lines_dropped
}

#[tokio::test]
async fn a_closed_stderr_loses_log_lines_not_leases() {
    // Closed before the broker wrote anything.
    let broker = Broker::start_with(Options {
        stderr: Stderr::Closed,
        env: vec![("GPULEASE__METRICS__LISTEN", "127.0.0.1:0")],
        ..Options::default()
    })
    .await;
    cycle(&broker, 5).await;
    let status = broker.idle().await;
    assert_eq!(status.total_grants, 5);
    assert!(dropped(&status) > 0, "{status:?}");
    // The metrics count them too.
    let exposition = broker.scrape().await;
    let counted: u64 = exposition
        .lines()
        .find_map(|line| line.strip_prefix("gpulease_log_lines_dropped_total "))
        .and_then(|value| value.trim().parse().ok())
        .expect("gpulease_log_lines_dropped_total");
    assert!(counted > 0, "{exposition}");

    // Closed while it serves: the reader goes away after the first lines.
    let mut broker = Broker::start_with(Options {
        stderr: Stderr::Capture,
        ..Options::default()
    })
    .await;
    broker.log().wait_for(&["broker ready"]).await;
    let before = dropped(&broker.status().await);
    broker.log().close();
    cycle(&broker, 5).await;
    let status = broker.idle().await;
    assert_eq!(status.total_grants, 5);
    assert!(dropped(&status) > before, "{status:?}");
    assert!(broker.terminate().await.success());
}

#[tokio::test]
async fn a_stderr_that_nobody_reads_never_blocks_the_broker() {
    // Trace level writes dozens of lines per call: the pipe fills at once.
    let broker = Broker::start_with(Options {
        stderr: Stderr::Unread,
        env: vec![("RUST_LOG", "trace")],
        ..Options::default()
    })
    .await;
    cycle(&broker, 60).await;
    let status = broker.idle().await;
    assert_eq!(status.total_grants, 60);
    assert!(dropped(&status) > 0, "{status:?}");
}

#[tokio::test]
async fn serve_piped_into_head_keeps_granting() {
    // `gpulease serve 2>&1 | head -1`, as a new user would try it.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("gpulease.sock");
    let script = format!(
        "{BIN} serve 2>&1 | head -1 > {first}",
        first = dir.path().join("first-line").display()
    );
    let mut pipeline = tokio::process::Command::new("sh")
        .args(["-c", &script])
        .env("GPULEASE__LISTEN", "")
        .env("GPULEASE__SOCKET", &socket)
        .env("GPULEASE__STATE_DIR", dir.path().join("state"))
        .env("GPULEASE__GPU__SOURCE", "static")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The pipeline's output is gone, so the socket file is the only sign
    // that the broker listens: look for it, a bounded number of times.
    let address = format!("unix:{}", socket.display());
    let mut client = None;
    for _ in 0..400 {
        if let Ok(connected) = gpulease_client::connect(&address).await
            && connected
                .clone()
                .status(pb::StatusRequest::default())
                .await
                .is_ok()
        {
            client = Some(connected);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = client.expect("the broker never answered on its socket");
    for i in 0..5 {
        let mut call = Call::open_with_client(client.clone(), acquire(&format!("user{i}")))
            .await
            .unwrap();
        call.granted().await;
        call.release().await;
    }
    let status = client
        .clone()
        .status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.total_grants, 5);
    assert!(dropped(&status) > 0);
    let first = std::fs::read_to_string(dir.path().join("first-line")).unwrap();
    assert_eq!(first.lines().count(), 1, "{first:?}");
    // SIGTERM to the broker ends the pipeline.
    let serve = find_child(pipeline.id().unwrap(), BIN).expect("the broker is a child of sh");
    nix::sys::signal::kill(serve, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(PATIENCE, pipeline.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// The child of `parent` running `program`, from /proc.
fn find_child(parent: u32, program: &str) -> Option<nix::unistd::Pid> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The parent's pid is the second field after the parenthesised name.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok());
        let exe = std::fs::read_link(entry.path().join("exe")).ok();
        if ppid == Some(parent) && exe.is_some_and(|exe| exe.to_string_lossy() == program) {
            return Some(nix::unistd::Pid::from_raw(pid));
        }
    }
    None
}

#[tokio::test]
async fn a_panic_ends_the_broker_at_once_and_a_restart_still_fences() {
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().display().to_string();
    let mut broker = Broker::start_with(Options {
        env: vec![
            ("GPULEASE__STATE_DIR", &state_dir),
            ("GPULEASE_FAIL_POINT", "grant"),
        ],
        stderr: Stderr::Capture,
        ..Options::default()
    })
    .await;
    // The grant's log line panics: the process must end, not stay up
    // holding a permit for a lease nobody heard of.
    let call = Call::open(&broker, acquire("victim")).await;
    if let Ok(mut call) = call {
        assert!(call.next().await.is_err(), "no lease may come out of it");
    }
    let exit = tokio::time::timeout(PATIENCE, broker.child.wait())
        .await
        .expect("the broker did not end after a panic")
        .unwrap();
    let abort = nix::sys::signal::Signal::SIGABRT as i32;
    assert_eq!(exit.signal(), Some(abort), "{exit:?}");
    broker.log().wait_for(&["panic", "aborting"]).await;

    // Its supervisor restarts it on the same state directory: tokens go on
    // above anything the crashed start could have handed out.
    let broker = Broker::with_env(&[("GPULEASE__STATE_DIR", &state_dir)]).await;
    let mut call = Call::open(&broker, acquire("next")).await.unwrap();
    let granted = call.granted().await;
    assert!(granted.fencing_token > 10_000, "{granted:?}");
    call.release().await;
}

#[tokio::test]
async fn sighup_and_sigpipe_leave_the_broker_and_its_leases_alone() {
    let mut broker = Broker::start_with(Options {
        stderr: Stderr::Capture,
        socket: true,
        ..Options::default()
    })
    .await;
    let mut holder = Call::open(&broker, acquire("holder")).await.unwrap();
    let granted = holder.granted().await;
    signal(&broker.child, nix::sys::signal::Signal::SIGHUP);
    // SIGHUP reloads the configuration (nothing changed); it never kills.
    broker.log().wait_for(&["SIGHUP received"]).await;
    signal(&broker.child, nix::sys::signal::Signal::SIGPIPE);
    let status = broker.status().await;
    assert_eq!(status.holders.len(), 1);
    assert_eq!(status.holders[0].fencing_token, granted.fencing_token);
    holder.release().await;
    let mut next = Call::open(&broker, acquire("next")).await.unwrap();
    next.granted().await;
    next.release().await;
    // And it still shuts down cleanly, removing its socket.
    let socket = broker.socket.clone().unwrap();
    assert!(broker.terminate().await.success());
    assert!(!socket.exists());
}

/// `gpulease serve` on `state_dir` with `args`, expected to exit before
/// serving.
fn serve_once(state_dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    StdCommand::new(BIN)
        .arg("serve")
        .args(args)
        .env_remove("GPULEASE_CONFIG")
        .env("GPULEASE__LISTEN", "127.0.0.1:0")
        .env("GPULEASE__STATE_DIR", state_dir)
        .env("GPULEASE__GPU__SOURCE", "static")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs a broker on `state_dir` until it granted `n` leases; returns their
/// tokens.
async fn grant_on(state_dir: &str, args: &[&str], n: usize) -> Vec<u64> {
    let mut broker = Broker::start_with(Options {
        env: vec![("GPULEASE__STATE_DIR", state_dir)],
        args: args.to_vec(),
        ..Options::default()
    })
    .await;
    let mut tokens = Vec::new();
    for _ in 0..n {
        let mut call = Call::open(&broker, acquire("fenced")).await.unwrap();
        tokens.push(call.granted().await.fencing_token);
        call.release().await;
    }
    assert!(broker.terminate().await.success());
    tokens
}

#[tokio::test]
async fn a_damaged_state_file_stops_the_broker_and_reset_state_never_repeats_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().display().to_string();
    let file = dir.path().join("state");
    let mut seen = grant_on(&state_dir, &[], 3).await;
    assert_eq!(seen, [1, 2, 3]);
    let whole = std::fs::read_to_string(&file).unwrap();

    for (damage, problem) in [
        (String::new(), "is empty"),
        ("# gpulease state\n".to_owned(), "no `token_ceiling`"),
        (whole[..whole.len() - 3].to_owned(), "truncated"),
        (
            whole.replace("token_ceiling", "token_cieling"),
            "unknown key",
        ),
        (
            whole
                .lines()
                .filter(|l| !l.starts_with("epoch"))
                .map(|l| format!("{l}\n"))
                .collect(),
            "no `epoch`",
        ),
        (
            format!("token_ceiling {}\nepoch 1\n", u64::MAX - 3),
            "no room",
        ),
    ] {
        std::fs::write(&file, &damage).unwrap();
        let output = serve_once(dir.path(), &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(73), "{damage:?}: {stderr}");
        assert!(
            stderr.contains(&*file.to_string_lossy()) && stderr.contains(problem),
            "{damage:?}: {stderr}"
        );
        assert!(stderr.contains("--reset-state"), "{stderr}");
        assert!(
            output.stdout.is_empty(),
            "nothing may be served: {output:?}"
        );
    }

    // The recovery: the file is lost for good (empty), and --reset-state
    // starts from the wall clock, above every token handed out before.
    std::fs::write(&file, "").unwrap();
    let after_reset = grant_on(&state_dir, &["--reset-state"], 2).await;
    let floor = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
        - 600_000_000;
    assert!(after_reset[0] > floor, "{after_reset:?}");
    // And an ordinary restart afterwards goes on above those.
    let after_restart = grant_on(&state_dir, &[], 1).await;
    seen.extend(&after_reset);
    seen.extend(&after_restart);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    // A reset on a healthy file goes on above it too.
    let again = grant_on(&state_dir, &["--reset-state"], 1).await;
    assert!(again[0] > *seen.last().unwrap(), "{again:?} after {seen:?}");
}

fn labelled(consumer: &str, labels: &[(String, String)]) -> pb::Acquire {
    pb::Acquire {
        labels: labels.iter().cloned().collect(),
        ..acquire(consumer)
    }
}

#[tokio::test]
async fn labels_and_messages_are_bounded() {
    let broker = Broker::start().await;
    let label = |k: usize, v: usize| ("k".repeat(k), "v".repeat(v));
    // At the limits: accepted.
    let mut at_limit: Vec<(String, String)> = (0..16)
        .map(|i| (format!("{i:0>63}"), "v".repeat(256)))
        .collect();
    let mut call = Call::open(&broker, labelled("full", &at_limit))
        .await
        .unwrap();
    call.granted().await;
    call.release().await;
    // One more label, a key or a value too long, an empty key: refused,
    // naming the limit.
    at_limit.push(label(1, 1));
    for (labels, limit) in [
        (at_limit, "limits.max_labels"),
        (vec![label(64, 1)], "limits.max_label_key_bytes"),
        (vec![label(3, 257)], "limits.max_label_value_bytes"),
        (vec![label(0, 3)], "empty"),
    ] {
        let error = Call::open(&broker, labelled("big", &labels))
            .await
            .err()
            .expect("refused");
        assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
        assert!(error.message().contains(limit), "{error:?}");
    }
    // A message over limits.max_message_bytes: RESOURCE_EXHAUSTED, on a
    // stream (AcquireLease) and on a unary call (RevokeLease).
    let huge = vec![("label".to_owned(), "x".repeat(70_000))];
    let error = Call::open(&broker, labelled("huge", &huge))
        .await
        .err()
        .expect("refused");
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    assert!(
        error.message().contains("limits.max_message_bytes"),
        "{error:?}"
    );
    let error = broker
        .client()
        .await
        .revoke_lease(pb::RevokeLeaseRequest {
            fencing_token: 1,
            message: "x".repeat(70_000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    assert!(
        error.message().contains("limits.max_message_bytes"),
        "{error:?}"
    );
    crate::support::assert_idle(&broker).await;
}

#[tokio::test]
async fn the_queue_is_bounded_in_all_and_per_consumer() {
    let broker = Broker::start_with(Options {
        config: Some("[limits]\nmax_waiters = 3\nmax_waiters_per_consumer = 2\n"),
        ..Options::default()
    })
    .await;
    let mut holder = Call::open(&broker, acquire("a")).await.unwrap();
    holder.granted().await;
    let mut waiters = Vec::new();
    for _ in 0..2 {
        let mut waiter = Call::open(&broker, acquire("a")).await.unwrap();
        waiter.queued().await;
        waiters.push(waiter);
    }
    let full = |error: tonic::Status, key: &str| {
        assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
        assert!(
            error.message().contains("queue full") && error.message().contains(key),
            "{error:?}"
        );
    };
    let error = Call::open(&broker, acquire("a")).await.err().unwrap();
    full(error, "limits.max_waiters_per_consumer");
    let mut b = Call::open(&broker, acquire("b")).await.unwrap();
    b.queued().await;
    let error = Call::open(&broker, acquire("c")).await.err().unwrap();
    full(error, "limits.max_waiters`");
    // A place that is given up is free again.
    b.release().await;
    let mut c = Call::open(&broker, acquire("c")).await.unwrap();
    c.queued().await;
    drop((c, waiters));
    holder.release().await;
    crate::support::assert_idle(&broker).await;
}

#[tokio::test]
async fn streams_per_connection_are_bounded() {
    let broker = Broker::start_with(Options {
        config: Some("[limits]\nmax_streams_per_connection = 2\n"),
        ..Options::default()
    })
    .await;
    // One connection: a holder and a waiter use its two streams.
    let client = broker.client().await;
    let mut holder = Call::open_with_client(client.clone(), acquire("holder"))
        .await
        .unwrap();
    holder.granted().await;
    let mut waiter = Call::open_with_client(client.clone(), acquire("waiter"))
        .await
        .unwrap();
    waiter.queued().await;
    // A third call on the same connection is not started by the broker
    // while two are open.
    let third = tokio::spawn(Call::open_with_client(client.clone(), acquire("third")));
    let unserved = tokio::time::timeout(Duration::from_millis(500), async {
        broker
            .wait_for("a third caller", |s| s.consumers.len() > 2)
            .await
    })
    .await;
    assert!(
        unserved.is_err(),
        "the third stream was served: {unserved:?}"
    );
    // Once a stream ends, it goes ahead.
    waiter.release().await;
    let mut third = tokio::time::timeout(PATIENCE, third)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    third.queued().await;
    holder.release().await;
    third.granted().await;
    third.release().await;
}

#[tokio::test]
async fn status_stays_small_under_ten_thousand_waiters() {
    const WAITERS: usize = 10_000;
    const PER_CONNECTION: usize = 500;
    let broker = Broker::start().await;
    let mut holder = Call::open(&broker, acquire("holder")).await.unwrap();
    holder.granted().await;
    // Each call returns once the broker has queued it. No watcher runs
    // meanwhile: every change would cost it a snapshot of the whole queue.
    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    let (queued, mut all_queued) = mpsc::channel::<()>(WAITERS);
    let mut tasks = tokio::task::JoinSet::new();
    for connection in 0..WAITERS / PER_CONNECTION {
        let client = broker.client().await;
        for i in 0..PER_CONNECTION {
            let client = client.clone();
            let mut stop = stop.subscribe();
            let queued = queued.clone();
            tasks.spawn(async move {
                let labels = [
                    ("job".to_owned(), format!("{connection}-{i}")),
                    ("note".to_owned(), "n".repeat(200)),
                ];
                let name = format!("w{connection}-{i}");
                let call = Call::open_with_client(client, labelled(&name, &labels))
                    .await
                    .unwrap();
                queued.send(()).await.unwrap();
                let _ = stop.recv().await;
                drop(call);
            });
        }
    }
    let filled = tokio::time::timeout(Duration::from_secs(180), async {
        for _ in 0..WAITERS {
            all_queued.recv().await.unwrap();
        }
    })
    .await;
    assert!(
        filled.is_ok(),
        "10,000 waiters were not queued in 3 minutes"
    );
    let status = broker.status().await;
    assert_eq!(status.queue_depth as usize, WAITERS);
    let size = status.encoded_len();
    assert!(size < 1_000_000, "Status is {size} bytes");
    assert_eq!(status.waiters.len(), 100);
    assert_eq!(status.waiters_omitted as usize, WAITERS - 100);
    assert_eq!(status.gpus[0].waiters.len(), 100);
    assert!(status.gpus[0].waiters.iter().all(|w| w.labels.is_empty()));
    assert!(status.consumers.len() <= 1_024 && status.consumers_omitted > 0);
    // `gpulease status` says how many it does not show.
    let shown = tokio::process::Command::new(BIN)
        .args(["status", "--broker", &broker.addr])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{shown:?}");
    assert!(text.contains("… and 9900 more waiting"), "{text}");
    // More waiters when asked, up to the cap.
    let more = broker
        .client()
        .await
        .status(pb::StatusRequest { max_waiters: 5_000 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(more.waiters.len(), 1_000);
    assert!(more.encoded_len() < 4 * 1024 * 1024);
    // WatchStatus is bounded the same way.
    let mut watch = broker
        .client()
        .await
        .watch_status(pb::StatusRequest { max_waiters: 10 })
        .await
        .unwrap()
        .into_inner();
    let snapshot = watch.message().await.unwrap().unwrap();
    assert_eq!(snapshot.waiters.len(), 10);
    drop(watch);
    let _ = stop.send(());
    while tasks.join_next().await.is_some() {}
    holder.release().await;
    crate::support::assert_idle(&broker).await;
}

const RESIDENT: &str = r#"
[auth]
admin_token = "admin-secret"

[gpu]
source = "static"
static_memory_mib = [24576]
safety_margin_mib = 0

[consumers.ollama]
kind = "llm"
vram_mib = 10240
unload = "stream"
token = "ollama-secret"

[consumers.image]
kind = "image"
token = "image-secret"
"#;

/// Opens `Residency` as `consumer` with `token`; the report sender and the
/// command stream, or the refusal.
async fn residency(
    broker: &Broker,
    token: Option<&str>,
    consumer: &str,
) -> Result<
    (
        mpsc::Sender<pb::ResidencyReport>,
        tonic::Streaming<pb::ResidencyCommand>,
    ),
    tonic::Status,
> {
    let options = gpulease_client::ConnectOptions {
        token: token.map(str::to_owned),
        ..Default::default()
    };
    let mut client = gpulease_client::connect_with(&broker.addr, &options)
        .await
        .unwrap();
    let (reports, rx) = mpsc::channel(4);
    reports
        .send(pb::ResidencyReport {
            kind: Some(pb::residency_report::Kind::Hello(pb::ResidencyHello {
                consumer: consumer.into(),
            })),
        })
        .await
        .unwrap();
    // The broker reads the hello before it answers: a refusal is the
    // call's status.
    let commands = client
        .residency(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((reports, commands))
}

fn unloaded(gpu_index: u32) -> pb::ResidencyReport {
    pb::ResidencyReport {
        kind: Some(pb::residency_report::Kind::Unloaded(pb::Unloaded {
            gpu_index,
            all_gpus: false,
        })),
    }
}

#[tokio::test]
async fn residency_needs_the_rights_of_its_consumer() {
    let broker = Broker::start_with(Options {
        config: Some(RESIDENT),
        ..Options::default()
    })
    .await;
    let none = residency(&broker, None, "ollama").await.err().unwrap();
    assert_eq!(none.code(), Code::Unauthenticated, "{none:?}");
    let other = residency(&broker, Some("image-secret"), "ollama")
        .await
        .err()
        .unwrap();
    assert_eq!(other.code(), Code::PermissionDenied, "{other:?}");
    let unknown = residency(&broker, Some("guess"), "ollama")
        .await
        .err()
        .unwrap();
    assert_eq!(unknown.code(), Code::Unauthenticated, "{unknown:?}");
    assert!(
        residency(&broker, Some("ollama-secret"), "ollama")
            .await
            .is_ok()
    );
    assert!(
        residency(&broker, Some("admin-secret"), "ollama")
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn an_unloaded_that_answers_no_request_is_ignored() {
    // Auth off, as by default: anyone may open Residency as ollama.
    let config = RESIDENT
        .replace("admin_token = \"admin-secret\"", "")
        .replace("token = \"ollama-secret\"", "");
    let config = config.replace("token = \"image-secret\"", "");
    let broker = Broker::start_with(Options {
        config: Some(&config),
        stderr: Stderr::Capture,
        ..Options::default()
    })
    .await;
    // ollama holds 10 GiB and stays resident.
    let mut ollama = Call::open(
        &broker,
        pb::Acquire {
            vram_mib: 10_240,
            ..acquire("ollama")
        },
    )
    .await
    .unwrap();
    ollama.granted().await;
    ollama.release().await;
    // An impostor claims ollama unloaded, unasked.
    let (reports, mut commands) = residency(&broker, None, "ollama").await.unwrap();
    reports.send(unloaded(0)).await.unwrap();
    broker
        .log()
        .wait_for(&["ignoring an `unloaded` that answers no unload request"])
        .await;
    let status = broker.status().await;
    let residents: Vec<_> = status.gpus[0]
        .residents
        .iter()
        .map(|r| &r.consumer)
        .collect();
    assert_eq!(residents, ["ollama"], "the claim changed nothing");
    // So 20 GiB is not granted beside ollama's 10 GiB: ollama is asked to
    // unload first, and only its answer to that request counts.
    let mut image = Call::open(
        &broker,
        pb::Acquire {
            vram_mib: 20_480,
            ..acquire("image")
        },
    )
    .await
    .unwrap();
    let queued = image.queued().await;
    assert!(queued.blocked_by.contains("ollama"), "{queued:?}");
    let command = tokio::time::timeout(PATIENCE, commands.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        command.kind,
        Some(pb::residency_command::Kind::UnloadRequested(_))
    ));
    reports.send(unloaded(0)).await.unwrap();
    image.granted().await;
    image.release().await;
}

#[tokio::test]
async fn a_silent_or_trickling_connection_is_closed() {
    let broker = Broker::start().await;
    // Never sends the preface.
    let silent = TcpStream::connect(&broker.addr).await.unwrap();
    // Sends it a byte every 400 ms: 33 bytes would take 13 s.
    let trickling = TcpStream::connect(&broker.addr).await.unwrap();
    let closed = |mut stream: TcpStream, trickle: bool| async move {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
        let mut buf = [0u8; 256];
        let mut sent = 0;
        loop {
            tokio::select! {
                read = stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return sent,
                    Ok(_) => {}
                },
                () = tokio::time::sleep(Duration::from_millis(400)), if trickle && sent < preface.len() => {
                    if stream.write_all(&preface[sent..=sent]).await.is_err() {
                        return sent;
                    }
                    sent += 1;
                }
            }
        }
    };
    let (silent, trickled) = tokio::time::timeout(PATIENCE, async {
        tokio::join!(closed(silent, false), closed(trickling, true))
    })
    .await
    .expect("the broker kept a connection without a preface open");
    assert_eq!(silent, 0);
    assert!(trickled < 33, "{trickled}");
    // A real client is served as ever.
    broker.status().await;
}

#[tokio::test]
async fn a_connection_flood_under_a_low_fd_limit_passes_and_serving_resumes_at_once() {
    // The broker raises its soft limit to the hard one: lower both.
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new("bash")
        .args(["-c", &format!("ulimit -n 64 && exec {BIN} serve")])
        .env_remove("GPULEASE_CONFIG")
        .env("GPULEASE__LISTEN", "127.0.0.1:0")
        .env("GPULEASE__STATE_DIR", dir.path().join("state"))
        .env("GPULEASE__GPU__SOURCE", "static")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt as _;
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(PATIENCE, stdout.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let addr = line.strip_prefix("listening on ").unwrap().to_owned();
    let (log_tx, mut log) = mpsc::unbounded_channel();
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            eprintln!("{line}");
            let _ = log_tx.send(line);
        }
    });
    // 200 connections that say nothing: far more than 64 descriptors.
    let mut flood = Vec::new();
    for _ in 0..200 {
        if let Ok(stream) = TcpStream::connect(&addr).await {
            flood.push(stream);
        }
    }
    // The broker says it is out of descriptors, once, and backs off.
    let said = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = log.recv().await {
            if line.contains("out of file descriptors") {
                return line;
            }
        }
        panic!("the broker's log ended");
    })
    .await
    .expect("no error about file descriptors");
    assert!(said.contains("backing off"), "{said}");
    drop(flood);
    // Serving again at once once the flood is gone (the broker must first
    // notice that the flood's connections closed).
    let client = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Ok(client) = gpulease_client::connect(&addr).await {
                let mut call = Call::open_with_client(client.clone(), acquire("after"))
                    .await
                    .unwrap();
                call.granted().await;
                call.release().await;
                return client;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the broker did not serve again");
    let status = client
        .clone()
        .status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.total_grants, 1);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the broker is still up"
    );
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let exit = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let broker = Broker::start_with(Options {
        config: Some(RESIDENT),
        ..Options::default()
    })
    .await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let mut request = tonic::Request::new(pb::RevokeLeaseRequest {
            fencing_token: 7,
            ..Default::default()
        });
        request.metadata_mut().insert(
            "authorization",
            format!("{scheme} admin-secret").parse().unwrap(),
        );
        let response = broker.client().await.revoke_lease(request).await;
        assert!(response.is_ok(), "{scheme}: {response:?}");
        assert!(!response.unwrap().into_inner().revoked);
    }
    let mut request = tonic::Request::new(pb::RevokeLeaseRequest::default());
    request
        .metadata_mut()
        .insert("authorization", "Basic admin-secret".parse().unwrap());
    let error = broker
        .client()
        .await
        .revoke_lease(request)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn queued_lists_a_few_holders_and_counts_the_rest() {
    let broker = Broker::with_env(&[("GPULEASE__CAPACITY", "20")]).await;
    let client = broker.client().await;
    let mut holders = Vec::new();
    for i in 0..20 {
        let mut holder = Call::open_with_client(client.clone(), acquire(&format!("h{i}")))
            .await
            .unwrap();
        holder.granted().await;
        holders.push(holder);
    }
    let mut waiter = Call::open(&broker, acquire("waiter")).await.unwrap();
    let queued = waiter.queued().await;
    assert_eq!((queued.holders.len(), queued.holders_omitted), (16, 4));
    let status = broker.status().await;
    assert_eq!((status.holders.len(), status.holders_omitted), (20, 0));
    let gpu = &status.gpus[0];
    assert_eq!((gpu.holders.len(), gpu.holders_omitted), (20, 0));
    drop(waiter);
    for holder in holders {
        holder.release().await;
    }
    crate::support::assert_idle(&broker).await;
}
