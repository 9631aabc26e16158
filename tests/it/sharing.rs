//! Sharing one card: priorities, preemption of a preemptible holder (a
//! `gpulease run` child gets SIGTERM; a client that does not release is
//! revoked), wait estimates, and Status showing them.

use std::process::Stdio;
use std::time::Duration;

use gpulease_client::pb::v1 as pb;
use gpulease_client::pb::v1::lease_event::Kind as EventKind;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tonic::Code;

use crate::support::{BIN, Broker, Call, Options, PATIENCE, acquire, assert_idle};

/// A training job that may be preempted, and a TTS service of higher
/// priority that asks it to make way at once.
pub(crate) const PREEMPTION: &str = r#"
[scheduling]
preempt_after = "0s"

[consumers.train]
preemptible = true
preempt_grace = "30s"

[consumers.tts]
priority = 10
"#;

fn with_priority(consumer: &str, priority: Option<i32>) -> pb::Acquire {
    pb::Acquire {
        priority,
        ..acquire(consumer)
    }
}

#[tokio::test]
async fn run_asks_a_preemptible_command_to_stop_and_the_waiter_gets_the_gpu() {
    let broker = Broker::start_with(Options {
        config: Some(PREEMPTION),
        ..Options::default()
    })
    .await;
    // The command says it is ready once its trap is set, and on SIGTERM
    // says so and exits 7, so that the test can tell the signal reached it.
    let script = "trap 'echo got SIGTERM >&2; kill $!; exit 7' TERM; echo ready; \
                  sleep 600 </dev/null >/dev/null 2>&1 & wait";
    let mut child = Command::new(BIN)
        .args(["run", "--broker", &broker.addr, "--consumer", "train", "--"])
        .args(["sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(PATIENCE, stdout.next_line()).await;
    assert_eq!(ready.unwrap().unwrap().as_deref(), Some("ready"));
    let mut tts = Call::open(&broker, acquire("tts")).await.unwrap();
    let granted = tts.granted().await;
    assert!(granted.fencing_token >= 2);
    let output = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(7), "{stderr}");
    assert!(stderr.contains("got SIGTERM"), "{stderr}");
    assert!(
        stderr.contains("tts needs the GPU; asking the command to stop"),
        "{stderr}"
    );
    let ended = broker.status().await.ended.unwrap();
    // It released in time: nothing was revoked.
    assert_eq!((ended.released, ended.revoked), (1, 0), "{ended:?}");
    tts.release().await;
    assert_idle(&broker).await;
}

#[tokio::test]
async fn a_preemptible_holder_that_keeps_the_gpu_is_revoked_after_its_grace() {
    let config = PREEMPTION.replace("preempt_grace = \"30s\"", "preempt_grace = \"300ms\"");
    let broker = Broker::start_with(Options {
        config: Some(&config),
        ..Options::default()
    })
    .await;
    let mut train = Call::open(&broker, acquire("train")).await.unwrap();
    train.granted().await;
    let mut tts = Call::open(&broker, acquire("tts")).await.unwrap();
    match train.next().await {
        Ok(Some(EventKind::PreemptRequested(asked))) => {
            assert_eq!(asked.for_consumer, "tts");
            assert!(asked.grace_ms <= 300, "{asked:?}");
        }
        other => panic!("expected preempt_requested, got {other:?}"),
    }
    let holders = broker.status().await.holders;
    assert!(holders[0].preempt_requested, "{holders:?}");
    match train.next().await {
        Ok(Some(EventKind::Revoked(revoked))) => {
            assert_eq!(revoked.reason(), pb::RevokeReason::Preempted, "{revoked:?}");
        }
        other => panic!("expected revoked, got {other:?}"),
    }
    let message = train.ends_with(Code::Aborted).await;
    assert!(message.contains("preempted"), "{message}");
    tts.granted().await;
    let ended = broker.status().await.ended.unwrap();
    assert_eq!(ended.revoked, 1, "{ended:?}");
    tts.release().await;
}

#[tokio::test]
async fn waiters_are_ordered_by_priority_and_a_request_may_lower_its_own() {
    let broker = Broker::start_with(Options {
        config: Some(PREEMPTION),
        ..Options::default()
    })
    .await;
    let mut holder = Call::open(&broker, acquire("other")).await.unwrap();
    holder.granted().await;
    let mut low = Call::open(&broker, acquire("batch")).await.unwrap();
    assert_eq!(low.queued().await.position, 1);
    let mut humble = Call::open(&broker, with_priority("tts", Some(-3)))
        .await
        .unwrap();
    assert_eq!(humble.queued().await.position, 2);
    let mut urgent = Call::open(&broker, with_priority("tts", Some(1_000)))
        .await
        .unwrap();
    let queued = urgent.queued().await;
    // Asked for 1,000; the consumer's priority is 10.
    assert_eq!((queued.position, queued.priority), (1, 10), "{queued:?}");
    let status = broker.status().await;
    let order: Vec<(String, i32)> = status
        .waiters
        .iter()
        .map(|w| (w.consumer.clone(), w.priority))
        .collect();
    assert_eq!(
        order,
        [
            ("tts".to_owned(), 10),
            ("batch".to_owned(), 0),
            ("tts".to_owned(), -3)
        ]
    );
    let tts = status.consumers.iter().find(|c| c.name == "tts").unwrap();
    assert_eq!(tts.priority, 10);
    holder.release().await;
    urgent.granted().await;
    urgent.release().await;
    low.granted().await;
    low.release().await;
    humble.granted().await;
    humble.release().await;
}

#[tokio::test]
async fn estimated_waits_come_from_the_hold_times_learned() {
    let broker = Broker::start().await;
    // Three leases of 300 ms teach the broker the job's typical hold.
    for _ in 0..3 {
        let mut call = Call::open(&broker, acquire("job")).await.unwrap();
        call.granted().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        call.release().await;
    }
    let mut holder = Call::open(&broker, acquire("job")).await.unwrap();
    holder.granted().await;
    let mut waiter = Call::open(&broker, acquire("job")).await.unwrap();
    let queued = waiter.queued().await;
    assert!(
        (1..=1_000).contains(&queued.estimated_wait_ms),
        "{queued:?}"
    );
    let mut second = Call::open(&broker, acquire("job")).await.unwrap();
    let behind = second.queued().await;
    // One holder's rest and one more typical hold ahead of it.
    assert!(
        behind.estimated_wait_ms > queued.estimated_wait_ms && behind.estimated_wait_ms <= 2_000,
        "{behind:?} behind {queued:?}"
    );
    let status = broker.status().await;
    assert!(
        status.waiters.iter().all(|w| w.estimated_wait_ms > 0),
        "{status:#?}"
    );
    let output = Command::new(BIN)
        .args(["status", "--broker", &broker.addr])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("ESTIMATE") && text.contains("~"), "{text}");
    holder.release().await;
    waiter.granted().await;
    waiter.release().await;
    second.granted().await;
    second.release().await;
}
