//! VRAM-aware admission, residency and eviction, on the real NVML code
//! path: the broker loads a fake `libnvidia-ml.so` (built here from
//! `tests/fake_nvml/fake_nvml.c`) that reads the GPUs from a file this test
//! rewrites while the broker runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use gpulease_client::pb::v1 as pb;
use gpulease_client::pb::v1::lease_request::Kind as RequestKind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::support::{BIN, Broker, Call, Options, Worker, acquire};

pub(crate) const GIB: u64 = 1024;

/// Builds the fake NVML library once per test process.
pub(crate) fn fake_library() -> &'static Path {
    static LIBRARY: OnceLock<PathBuf> = OnceLock::new();
    LIBRARY.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_nvml/fake_nvml.c");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let library = dir.join("libfake_nvml.so");
        // Test processes run in parallel: build privately, then rename.
        let private = dir.join(format!("libfake_nvml.{}.so", std::process::id()));
        let status = Command::new("gcc")
            .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"])
            .arg(&private)
            .arg(&source)
            .status()
            .expect("gcc builds the fake NVML library");
        assert!(status.success(), "gcc failed on {}", source.display());
        std::fs::rename(&private, &library).unwrap();
        library
    })
}

/// The fake GPUs' state file.
pub(crate) struct FakeGpus {
    pub(crate) path: PathBuf,
}

impl FakeGpus {
    /// Writes the state: `gpus` as (uuid, total MiB), `procs` as (gpu, pid,
    /// MiB). Used memory is the sum of the processes' plus `extra_used`.
    pub(crate) fn set(&self, gpus: &[(&str, u64)], procs: &[(u32, u32, u64)]) {
        let mut text = String::new();
        for (index, (uuid, total)) in gpus.iter().enumerate() {
            let used: u64 = procs
                .iter()
                .filter(|p| p.0 as usize == index)
                .map(|p| p.2)
                .sum();
            text += &format!("gpu {index} {uuid} {total} {used} Fake GPU {index}\n");
        }
        for (gpu, pid, used) in procs {
            text += &format!("proc {gpu} {pid} {used}\n");
        }
        let temporary = self.path.with_extension("new");
        std::fs::write(&temporary, text).unwrap();
        std::fs::rename(&temporary, &self.path).unwrap();
    }
}

pub(crate) const CONSUMERS: &str = r#"
[gpu]
source = "nvml"
safety_margin_mib = 0
poll_interval = "50ms"
unload_timeout = "500ms"

[consumers.tts]
kind = "tts"
vram_mib = 3072
coexist = true
unload = { command = ["sh", "-c", "echo $GPULEASE_CONSUMER $GPULEASE_GPU_UUID >> unloads.log"] }

[consumers.llm]
kind = "llm"
vram_mib = 10240
unload = { command = ["sh", "-c", "echo $GPULEASE_CONSUMER $GPULEASE_GPU_UUID >> unloads.log"] }

[consumers.image]
kind = "image"
vram_mib = 12288

[consumers.streamer]
kind = "llm"
vram_mib = 10240
unload = "stream"
"#;

/// A broker on the fake NVML with `gpus`, and the state file to change.
async fn broker_with(gpus: &[(&str, u64)]) -> (Broker, FakeGpus) {
    broker_with_state(gpus, &[], &[]).await
}

/// The same, with processes on the GPUs from the start and more settings.
pub(crate) async fn broker_with_state(
    gpus: &[(&str, u64)],
    procs: &[(u32, u32, u64)],
    env: &[(&str, &str)],
) -> (Broker, FakeGpus) {
    let library = fake_library().display().to_string();
    let state = tempfile::NamedTempFile::new()
        .unwrap()
        .into_temp_path()
        .keep()
        .unwrap();
    let fake = FakeGpus { path: state };
    fake.set(gpus, procs);
    let state = fake.path.display().to_string();
    let mut all_env = vec![
        ("GPULEASE__GPU__NVML_LIBRARY", library.as_str()),
        ("FAKE_NVML_STATE", state.as_str()),
    ];
    all_env.extend_from_slice(env);
    let broker = Broker::start_with(Options {
        env: all_env,
        config: Some(CONSUMERS),
        ..Options::default()
    })
    .await;
    (broker, fake)
}

/// Opens a `Residency` stream for `consumer`: the sender of its reports
/// (after `hello`) and the broker's commands.
async fn open_residency(
    broker: &Broker,
    consumer: &str,
) -> (
    mpsc::Sender<pb::ResidencyReport>,
    tonic::Streaming<pb::ResidencyCommand>,
) {
    let (reports, rx) = mpsc::channel(4);
    reports
        .send(pb::ResidencyReport {
            kind: Some(pb::residency_report::Kind::Hello(pb::ResidencyHello {
                consumer: consumer.into(),
            })),
        })
        .await
        .unwrap();
    let commands = broker
        .client()
        .await
        .residency(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (reports, commands)
}

/// `consumer` (process `pid`) uses 10 GiB of the 16 GiB card and stays
/// resident; then `image` asks for 12 GiB, which does not fit beside it.
async fn image_after_resident(broker: &Broker, fake: &FakeGpus, consumer: &str, pid: u32) -> Call {
    let card = [("GPU-fake-0", 16 * GIB)];
    fake.set(&card, &[(0, pid, 10 * GIB)]);
    use_once(broker, consumer, pid).await;
    broker
        .wait_for("the consumer resident", |s| s.gpus[0].free_mib == 6 * GIB)
        .await;
    let mut request = acquire("image");
    request.vram_mib = 12 * GIB;
    Call::open(broker, request).await.unwrap()
}

/// `consumer` (process `pid`) takes a lease and releases it, leaving it
/// resident.
pub(crate) async fn use_once(broker: &Broker, consumer: &str, pid: u32) {
    let mut request = acquire(consumer);
    request.client_pid = pid;
    let mut call = Call::open(broker, request).await.unwrap();
    call.granted().await;
    call.release().await;
}

fn resident(status: &pb::StatusResponse, gpu: usize) -> Vec<String> {
    status.gpus[gpu]
        .residents
        .iter()
        .map(|r| r.consumer.clone())
        .collect()
}

#[tokio::test]
async fn the_llm_is_asked_to_unload_for_the_image_and_the_tts_stays() {
    let card = [("GPU-fake-0", 16 * GIB)];
    let (broker, fake) = broker_with(&card).await;
    let status = broker.status().await;
    assert_eq!(status.inventory, "nvml");
    assert_eq!(status.gpus[0].name, "Fake GPU 0");
    assert_eq!(
        (status.gpus[0].total_mib, status.gpus[0].free_mib),
        (16 * GIB, 16 * GIB)
    );

    // TTS and the LLM work, then stay loaded while idle. Their processes
    // are the test's children, so that their leases may claim them.
    let (tts, llm) = (Worker::start(), Worker::start());
    let (tts, llm) = (tts.pid(), llm.pid());
    fake.set(&card, &[(0, tts, 3 * GIB)]);
    use_once(&broker, "tts", tts).await;
    fake.set(&card, &[(0, tts, 3 * GIB), (0, llm, 10 * GIB)]);
    use_once(&broker, "llm", llm).await;
    let status = broker
        .wait_for("both resident, memory read", |s| {
            s.gpus[0].residents.len() == 2 && s.gpus[0].free_mib == 3 * GIB
        })
        .await;
    assert_eq!(resident(&status, 0), ["llm", "tts"]);

    let mut request = acquire("image");
    request.vram_mib = 12 * GIB;
    let mut image = Call::open(&broker, request).await.unwrap();
    let queued = image.queued().await;
    assert!(
        queued.blocked_by.contains("asked llm to unload"),
        "{queued:?}"
    );

    broker
        .wait_for("the unload command to run", |s| {
            s.evictions.as_ref().is_some_and(|e| e.requested == 1)
        })
        .await;
    // The LLM frees its memory; the grant follows the next reading.
    fake.set(&card, &[(0, tts, 3 * GIB)]);
    let granted = image.granted().await;
    assert_eq!(
        (granted.gpu_index, granted.gpu_uuid.as_str()),
        (0, "GPU-fake-0")
    );

    let status = broker.status().await;
    assert_eq!(resident(&status, 0), ["tts"]);
    let evictions = status.evictions.unwrap();
    assert_eq!(
        (evictions.completed, evictions.last_victim.as_str()),
        (1, "llm")
    );
    // The command ran with the consumer and the GPU in its environment. It
    // signals nothing the test could await, so look for its file.
    let deadline = tokio::time::Instant::now() + crate::support::PATIENCE;
    let log = loop {
        let log = std::fs::read_to_string(broker.path("unloads.log")).unwrap_or_default();
        if !log.is_empty() || tokio::time::Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(log, "llm GPU-fake-0\n");
    image.release().await;
}

#[tokio::test]
async fn a_resident_that_does_not_free_its_memory_is_named_and_the_waiter_stays() {
    let card = [("GPU-fake-0", 16 * GIB)];
    let (broker, fake) = broker_with(&card).await;
    let mut image = image_after_resident(&broker, &fake, "llm", 1002).await;
    image.queued().await;
    let status = broker
        .wait_for("the culprit named", |s| {
            s.gpus[0].blocked_by.contains("llm did not free its memory")
        })
        .await;
    assert_eq!(status.queue_depth, 1);
    assert!(status.gpus[0].residents[0].unload_failed);
    assert_eq!(status.evictions.unwrap().failed, 1);
    // The waiter hears it too, after what it heard on the way (the reading
    // after the LLM's lease ended, the unload asked).
    let mut heard = Vec::new();
    loop {
        let update = image.queued().await;
        if update.blocked_by.contains("llm did not free") {
            break;
        }
        heard.push(update.blocked_by);
        assert!(heard.len() < 8, "never heard of the culprit: {heard:?}");
    }
}

#[tokio::test]
async fn requests_spread_over_two_gpus_and_gpulease_run_sees_its_gpu() {
    let cards = [("GPU-fake-0", 16 * GIB), ("GPU-fake-1", 16 * GIB)];
    let (broker, _fake) = broker_with(&cards).await;
    let mut first = Call::open(&broker, acquire("a")).await.unwrap();
    let a = first.granted().await;
    let mut second = Call::open(&broker, acquire("b")).await.unwrap();
    let b = second.granted().await;
    assert_ne!(a.gpu_index, b.gpu_index, "both leases on one GPU");

    // Naming a GPU by UUID waits for that GPU.
    let mut request = acquire("c");
    request.gpu = "GPU-fake-1".into();
    let mut third = Call::open(&broker, request).await.unwrap();
    assert_eq!(third.queued().await.gpu_index, 1);
    drop(third);

    let output = tokio::process::Command::new(BIN)
        .args([
            "run",
            "--broker",
            &broker.addr,
            "--consumer",
            "job",
            "--gpu",
            "0",
            "--",
        ])
        .args(["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"])
        .output();
    if a.gpu_index == 0 {
        first.release().await;
    } else {
        second.release().await;
    }
    let output = output.await.unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "GPU-fake-0");
}

#[tokio::test]
async fn a_request_larger_than_any_card_is_resource_exhausted() {
    let (broker, _fake) = broker_with(&[("GPU-fake-0", 16 * GIB)]).await;
    let mut request = acquire("huge");
    request.vram_mib = 20 * GIB;
    let status = match Call::open(&broker, request).await {
        Err(status) => status,
        Ok(mut call) => call.next().await.unwrap_err(),
    };
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("20480 MiB") && status.message().contains("16384 MiB"));
    assert_eq!(broker.status().await.queue_depth, 0);
}

#[tokio::test]
async fn a_process_without_a_lease_is_flagged() {
    let card = [("GPU-fake-0", 16 * GIB)];
    let (broker, fake) = broker_with(&card).await;
    let mut request = acquire("llm");
    let worker = Worker::start();
    request.client_pid = worker.pid();
    let mut holder = Call::open(&broker, request).await.unwrap();
    holder.granted().await;
    fake.set(&card, &[(0, worker.pid(), 9 * GIB), (0, 4321, 2 * GIB)]);
    let status = broker
        .wait_for("the stranger flagged", |s| !s.gpus[0].unleased.is_empty())
        .await;
    let unleased = &status.gpus[0].unleased;
    assert_eq!(
        (unleased.len(), unleased[0].pid, unleased[0].used_mib),
        (1, 4321, 2 * GIB)
    );
    // The holder's own usage is learned instead.
    assert_eq!(status.holders[0].peak_mib, 9 * GIB);
    holder.release().await;
}

#[tokio::test]
async fn a_consumer_on_a_residency_stream_is_asked_and_answers() {
    let card = [("GPU-fake-0", 16 * GIB)];
    let (broker, fake) = broker_with(&card).await;
    let (reports, mut commands) = open_residency(&broker, "streamer").await;

    let mut image = image_after_resident(&broker, &fake, "streamer", 2002).await;

    let command = commands.message().await.unwrap().unwrap();
    let Some(pb::residency_command::Kind::UnloadRequested(asked)) = command.kind else {
        panic!("expected UnloadRequested, got {command:?}");
    };
    assert_eq!((asked.gpu_index, asked.footprint_mib), (0, 10 * GIB));
    assert_eq!(asked.for_consumer, "image");
    fake.set(&card, &[]);
    reports
        .send(pb::ResidencyReport {
            kind: Some(pb::residency_report::Kind::Unloaded(pb::Unloaded {
                gpu_index: 0,
                all_gpus: false,
            })),
        })
        .await
        .unwrap();
    image.granted().await;
    image.send(RequestKind::Release(pb::Release {})).await;
}

#[tokio::test]
async fn without_nvml_the_static_inventory_is_used() {
    let broker = Broker::with_env(&[
        (
            "GPULEASE__GPU__NVML_LIBRARY",
            "/nonexistent/libnvidia-ml.so.1",
        ),
        ("GPULEASE__GPU__STATIC_MEMORY_MIB", "8192"),
    ])
    .await;
    let status = broker.status().await;
    assert_eq!(status.inventory, "static");
    assert_eq!((status.gpus.len(), status.gpus[0].total_mib), (1, 8 * GIB));
    assert!(!status.gpus[0].measured);
}

#[tokio::test]
async fn after_a_holder_vanishes_the_next_grant_waits_for_its_processes() {
    let card = [("GPU-fake-0", 16 * GIB)];
    let (broker, fake) = broker_with_state(&card, &[], &[("GPULEASE__LOCK_DELAY", "30s")]).await;
    let mut request = acquire("crasher");
    let worker = Worker::start();
    request.client_pid = worker.pid();
    let mut crasher = Call::open(&broker, request).await.unwrap();
    crasher.granted().await;
    fake.set(&card, &[(0, worker.pid(), 8 * GIB)]);
    broker
        .wait_for("the holder's process seen", |s| {
            s.gpus[0].free_mib == 8 * GIB
        })
        .await;
    let mut next = Call::open(&broker, acquire("next")).await.unwrap();
    next.queued().await;

    // The holder's connection drops, but its process still uses the GPU.
    drop(crasher);
    let fenced = broker
        .wait_for("the hand-over held back", |s| {
            s.gpus[0]
                .blocked_by
                .contains("crasher vanished without releasing")
        })
        .await;
    assert_eq!((fenced.in_flight, fenced.queue_depth), (0, 1));
    let update = next.queued().await;
    let pids = format!("({})", worker.pid());
    assert!(update.blocked_by.contains(&pids), "{update:?}");

    fake.set(&card, &[]);
    next.granted().await;
}

#[tokio::test]
async fn a_polite_release_hands_over_at_once_even_with_processes_left() {
    let card = [("GPU-fake-0", 16 * GIB)];
    let (broker, fake) = broker_with_state(&card, &[], &[("GPULEASE__LOCK_DELAY", "30s")]).await;
    let mut request = acquire("polite");
    request.client_pid = 4002;
    let mut polite = Call::open(&broker, request).await.unwrap();
    polite.granted().await;
    fake.set(&card, &[(0, 4002, 4 * GIB)]);
    broker
        .wait_for("the holder's process seen", |s| {
            s.gpus[0].free_mib == 12 * GIB
        })
        .await;
    let mut next = Call::open(&broker, acquire("next")).await.unwrap();
    next.queued().await;
    polite.release().await;
    next.granted().await;
}

#[tokio::test]
async fn at_start_a_gpu_busy_without_a_lease_is_quarantined() {
    let card = [("GPU-fake-0", 16 * GIB)];
    let procs = [(0, 777, 2 * GIB)];
    let (broker, fake) = broker_with_state(&card, &procs, &[("GPULEASE__LOCK_DELAY", "30s")]).await;
    let mut first = Call::open(&broker, acquire("first")).await.unwrap();
    let queued = first.queued().await;
    let status = broker
        .wait_for("the quarantine reported", |s| {
            s.gpus[0].blocked_by.contains("at start, processes 777")
        })
        .await;
    assert_eq!(status.in_flight, 0, "{queued:?}");
    fake.set(&card, &[]);
    first.granted().await;
}

#[tokio::test]
async fn an_unload_request_waits_for_a_residency_stream_that_opens_late() {
    let card = [("GPU-fake-0", 16 * GIB)];
    let (broker, fake) = broker_with(&card).await;
    let mut image = image_after_resident(&broker, &fake, "streamer", 2002).await;
    broker
        .wait_for("the unload asked for", |s| {
            s.evictions.as_ref().is_some_and(|e| e.requested == 1)
        })
        .await;

    // Only now does the streamer connect; it still hears the request.
    let (_reports, mut commands) = open_residency(&broker, "streamer").await;
    let command = commands.message().await.unwrap().unwrap();
    assert!(matches!(
        command.kind,
        Some(pb::residency_command::Kind::UnloadRequested(_))
    ));
    fake.set(&card, &[]);
    image.granted().await;
}

#[tokio::test]
async fn with_nvml_an_unloaded_claim_counts_only_once_a_reading_shows_it() {
    let card = [("GPU-fake-0", 16 * GIB)];
    let (broker, fake) = broker_with(&card).await;
    let (reports, mut commands) = open_residency(&broker, "streamer").await;
    let mut image = image_after_resident(&broker, &fake, "streamer", 2002).await;
    let command = commands.message().await.unwrap().unwrap();
    assert!(matches!(
        command.kind,
        Some(pb::residency_command::Kind::UnloadRequested(_))
    ));
    // It answers, but NVML still shows its 10 GiB: nothing changes.
    reports
        .send(pb::ResidencyReport {
            kind: Some(pb::residency_report::Kind::Unloaded(pb::Unloaded {
                gpu_index: 0,
                all_gpus: false,
            })),
        })
        .await
        .unwrap();
    let mut watch = broker
        .client()
        .await
        .watch_status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    // Every reading (every 50 ms while memory is awaited) is a snapshot.
    for _ in 0..8 {
        let snapshot = watch.message().await.unwrap().unwrap();
        assert_eq!(resident(&snapshot, 0), ["streamer"], "{snapshot:#?}");
        assert!(snapshot.holders.is_empty(), "granted on a claim alone");
    }
    // Once a reading shows the memory free, the image is granted.
    fake.set(&card, &[]);
    image.granted().await;
    image.send(RequestKind::Release(pb::Release {})).await;
}
