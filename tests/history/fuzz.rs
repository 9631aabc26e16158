//! Fuzzing the request handling of the real broker with proptest:
//! arbitrary sequences of `AcquireLease` messages with arbitrary field
//! values (consumer names that are empty, too long, or any Unicode; any
//! memory size, wait bound, GPU name and labels), second acquires,
//! releases at random points, half-closes and abrupt drops of the call or
//! of the whole connection, several calls at once.
//!
//! After every case, once all its calls ended: the broker still runs,
//! logged no panic, and holds no permit and no queue slot.

use std::time::Duration;

use gpulease_client::pb::v1 as pb;
use gpulease_client::pb::v1::lease_request::Kind as RequestKind;
use proptest::prelude::*;
use proptest::test_runner::{
    Config as RunnerConfig, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;

use crate::broker::{self, BrokerLog, BrokerProcess, Settings};
use crate::rng::Rng;

/// An `Acquire`'s fields.
#[derive(Clone, Debug)]
struct Fields {
    consumer: String,
    vram_mib: u64,
    max_wait_ms: u32,
    client_pid: u32,
    gpu: String,
    labels: Vec<(String, String)>,
    priority: Option<i32>,
}

/// A message on the request stream.
#[derive(Clone, Debug)]
enum Message {
    Acquire(Fields),
    Release,
    /// A `LeaseRequest` with no kind at all.
    Empty,
}

/// What a call does after its first message.
#[derive(Clone, Debug)]
enum Step {
    Send(Message),
    HalfClose,
    Read,
    Pause(u8),
    DropCall,
    DropConnection,
}

/// How a call starts.
#[derive(Clone, Debug)]
enum First {
    /// With this message.
    Message(Message),
    /// Half-closed before any message.
    Empty,
    /// Open, but silent: dropped before any message.
    Silent,
}

/// One call: how it starts and its steps.
#[derive(Clone, Debug)]
struct Script {
    first: First,
    steps: Vec<Step>,
}

fn consumer() -> impl Strategy<Value = String> {
    prop_oneof![
        10 => "[A-Za-z0-9._-]{1,64}",
        8 => prop::sample::select(vec!["a", "b", "holder"]).prop_map(String::from),
        1 => Just(String::new()),
        1 => "\\PC{0,80}",
        1 => "[a-z]{65,300}",
        1 => "[ -~]{1,40}",
    ]
}

fn fields() -> impl Strategy<Value = Fields> {
    (
        consumer(),
        prop_oneof![8 => Just(0u64), 2 => 0..30_000u64, 1 => any::<u64>()],
        prop_oneof![3 => Just(0u32), 2 => 1..200u32, 1 => any::<u32>()],
        any::<u32>(),
        prop_oneof![
            10 => Just(String::new()),
            2 => prop::sample::select(vec!["0", "1", "2", "GPU-00000000", "-1"]).prop_map(String::from),
            1 => "\\PC{0,12}",
        ],
        prop::collection::vec(("\\PC{0,8}", "\\PC{0,8}"), 0..3),
        prop_oneof![4 => Just(None), 1 => any::<i32>().prop_map(Some), 1 => (-3..3i32).prop_map(Some)],
    )
        .prop_map(
            |(consumer, vram_mib, max_wait_ms, client_pid, gpu, labels, priority)| Fields {
                consumer,
                vram_mib,
                max_wait_ms,
                client_pid,
                gpu,
                labels,
                priority,
            },
        )
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        6 => fields().prop_map(Message::Acquire),
        2 => Just(Message::Release),
        1 => Just(Message::Empty),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => message().prop_map(Step::Send),
        1 => Just(Step::HalfClose),
        3 => Just(Step::Read),
        3 => (0u8..15).prop_map(Step::Pause),
        1 => (100u8..250).prop_map(Step::Pause),
        1 => Just(Step::DropCall),
        1 => Just(Step::DropConnection),
    ]
}

fn script() -> impl Strategy<Value = Script> {
    (
        prop_oneof![
            8 => message().prop_map(First::Message),
            1 => Just(First::Empty),
            1 => Just(First::Silent),
        ],
        prop::collection::vec(step(), 0..8),
    )
        .prop_map(|(first, steps)| Script { first, steps })
}

fn request(message: Message) -> pb::LeaseRequest {
    pb::LeaseRequest {
        kind: match message {
            Message::Acquire(f) => Some(RequestKind::Acquire(pb::Acquire {
                consumer: f.consumer,
                vram_mib: f.vram_mib,
                max_wait_ms: f.max_wait_ms,
                client_pid: f.client_pid,
                labels: f.labels.into_iter().collect(),
                gpu: f.gpu,
                priority: f.priority,
            })),
            Message::Release => Some(RequestKind::Release(pb::Release {})),
            Message::Empty => None,
        },
    }
}

async fn run_script(addr: String, script: Script) {
    let Ok(client) = broker::connect(&addr).await else {
        return;
    };
    let mut client = Some(client);
    let (tx, rx) = mpsc::channel(16);
    // The broker answers (sends headers) once it has read the first
    // message; a silent call is dropped before that.
    let patience = match script.first {
        First::Silent => Duration::from_millis(50),
        _ => Duration::from_secs(5),
    };
    let mut requests = match script.first {
        First::Message(first) => {
            let _ = tx.try_send(request(first));
            Some(tx)
        }
        First::Empty => {
            drop(tx);
            None
        }
        First::Silent => Some(tx),
    };
    let call = match client.as_mut() {
        Some(client) => {
            tokio::time::timeout(patience, client.acquire_lease(ReceiverStream::new(rx))).await
        }
        None => return,
    };
    let mut events = match call {
        Ok(Ok(response)) => Some(response.into_inner()),
        _ => None,
    };
    for step in script.steps {
        match step {
            Step::Send(message) => {
                if let Some(tx) = &requests {
                    let _ = tx.try_send(request(message));
                }
            }
            Step::HalfClose => requests = None,
            Step::Read => {
                if let Some(events) = events.as_mut() {
                    let _ = tokio::time::timeout(Duration::from_millis(30), events.message()).await;
                }
            }
            Step::Pause(ms) => tokio::time::sleep(Duration::from_millis(u64::from(ms))).await,
            Step::DropCall => {
                events = None;
                requests = None;
            }
            Step::DropConnection => {
                events = None;
                requests = None;
                client = None;
            }
        }
    }
    drop((events, requests, client));
}

/// Runs the fuzzer against one broker for `cases` cases.
pub(crate) fn run(
    runtime: &tokio::runtime::Runtime,
    seed: u64,
    cases: u32,
) -> Result<Vec<String>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let settings = Settings {
        env: vec![
            ("GPULEASE__CAPACITY".into(), "1".into()),
            (
                "GPULEASE__GPU__STATIC_MEMORY_MIB".into(),
                "24576,8192".into(),
            ),
            ("GPULEASE__MAX_HOLD".into(), "150ms".into()),
            ("GPULEASE__KEEPALIVE__INTERVAL".into(), "1s".into()),
            ("GPULEASE__KEEPALIVE__TIMEOUT".into(), "1s".into()),
        ],
        state_dir: dir.path().join("state"),
        dir: dir.path().to_path_buf(),
    };
    let log = BrokerLog::default();
    let mut process = runtime.block_on(BrokerProcess::start(&settings, 1, &log))?;
    let addr = process.addr.clone();
    let rss_before = process.rss_kib();

    let mut seeds = Rng::new(seed);
    let mut bytes = [0u8; 32];
    for chunk in bytes.chunks_mut(8) {
        chunk.copy_from_slice(&seeds.next_u64().to_le_bytes());
    }
    let config = RunnerConfig {
        cases,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..RunnerConfig::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
    let calls = std::sync::atomic::AtomicU64::new(0);
    let pid = process.pid;
    let result = runner.run(&prop::collection::vec(script(), 1..8), |scripts| {
        calls.fetch_add(scripts.len() as u64, std::sync::atomic::Ordering::Relaxed);
        runtime.block_on(async {
            let mut set = JoinSet::new();
            for script in scripts {
                set.spawn(run_script(addr.clone(), script));
            }
            if tokio::time::timeout(Duration::from_secs(30), set.join_all())
                .await
                .is_err()
            {
                return Err(TestCaseError::fail(
                    "the case's calls did not finish in 30 s",
                ));
            }
            if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
                return Err(TestCaseError::fail("the broker died"));
            }
            if let Some(line) = log.panicked() {
                return Err(TestCaseError::fail(format!("the broker panicked: {line}")));
            }
            broker::wait_idle(&addr, Duration::from_secs(10))
                .await
                .map_err(TestCaseError::fail)
        })
    });
    let status = runtime.block_on(broker::status(&addr));
    let rss_after = process.rss_kib();
    let alive = process.alive();
    let exit = runtime.block_on(process.terminate());
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, case)) => {
            return Err(format!("fuzz case failed: {why}\nminimal case: {case:#?}"));
        }
        Err(TestError::Abort(why)) => return Err(format!("fuzzing aborted: {why}")),
    }
    if !alive {
        return Err("the broker died".into());
    }
    match exit {
        Ok(status) if status.success() => {}
        other => return Err(format!("the broker did not stop cleanly: {other:?}")),
    }
    let status = status?;
    let ended = status.ended.unwrap_or_default();
    Ok(vec![
        format!("seed: {seed}"),
        format!(
            "cases: {cases}, calls: {}",
            calls.load(std::sync::atomic::Ordering::Relaxed)
        ),
        format!("grants: {}", status.total_grants),
        format!(
            "ends: released {}, half-closed {}, disconnected {}, revoked {}, withdrawn {}, expired {}",
            ended.released,
            ended.half_closed,
            ended.disconnected,
            ended.revoked,
            ended.withdrawn,
            ended.expired
        ),
        format!(
            "broker RSS: {} KiB before, {} KiB after",
            rss_before.unwrap_or(0),
            rss_after.unwrap_or(0)
        ),
        "panics: 0, leaked permits or queue slots: 0".into(),
    ])
}
