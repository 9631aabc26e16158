//! The Rust client crate (`gpulease_client`) against the real broker: its
//! example, the `Lease` guard (release, drop, loss), the cancellation of
//! `acquire()`, and the queue-position and preemption callbacks.

use std::path::PathBuf;
use std::time::Duration;

use gpulease_client::pb::v1 as pb;
use gpulease_client::{Client, Error, Lost};
use tokio::sync::mpsc;
use tonic::Code;

use crate::support::{BIN, Broker, Options, PATIENCE, assert_idle};

/// The crate's example binary, built next to `gpulease` by `cargo build -p
/// gpulease-client --examples` (as `scripts/test` does).
fn example() -> PathBuf {
    let path = PathBuf::from(BIN)
        .parent()
        .expect("the binary is in a directory")
        .join("examples/lease");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p gpulease-client --examples`",
        path.display()
    );
    path
}

async fn ended(broker: &Broker) -> pb::LeaseEndCounts {
    broker.status().await.ended.expect("Status has end counts")
}

/// The next value on `rx`, or a failure after [`PATIENCE`].
async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("nothing came in time")
        .expect("the sender is still there")
}

/// Asserts that `error` is the broker's status `code`.
fn assert_status(error: Error, code: Code) {
    match error {
        Error::Status(status) => assert_eq!(status.code(), code, "{status:?}"),
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn the_example_takes_a_lease_prints_its_token_and_releases_it() {
    let broker = Broker::start().await;
    let output = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(example())
            .args([&broker.addr, "example-test"])
            .output(),
    )
    .await
    .expect("the example ran in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("fencing token 1"), "{stdout}");
    assert!(stdout.contains("CUDA_VISIBLE_DEVICES=0"), "{stdout}");
    assert!(stdout.ends_with("released\n"), "{stdout}");
    let status = broker.status().await;
    assert_eq!(status.total_grants, 1);
    let ended = status.ended.unwrap();
    assert_eq!((ended.released, ended.disconnected), (1, 0), "{ended:?}");
    assert!(
        status.consumers.iter().any(|c| c.name == "example-test"),
        "{:?}",
        status.consumers
    );
}

#[tokio::test]
async fn a_lease_is_granted_as_asked_shown_in_status_and_released() {
    let broker = Broker::start().await;
    let lease = Client::connect(&broker.addr)
        .await
        .unwrap()
        .lease("mvoice")
        .vram_mib(4000)
        .label("job", "7")
        .client_pid(std::process::id())
        .acquire()
        .await
        .unwrap();
    assert_eq!(lease.token(), 1);
    assert_eq!(lease.gpu(), 0);
    assert!(lease.is_held());
    let status = broker.status().await;
    let holder = &status.holders[0];
    assert_eq!(holder.consumer, "mvoice");
    assert_eq!(holder.lease_id, lease.lease_id());
    assert_eq!(holder.fencing_token, lease.token());
    assert_eq!(holder.labels.get("job").map(String::as_str), Some("7"));
    lease.release().await.unwrap();
    assert_idle(&broker).await;
    let ended = ended(&broker).await;
    assert_eq!((ended.released, ended.disconnected), (1, 0), "{ended:?}");
}

#[tokio::test]
async fn dropping_a_lease_releases_it_politely_and_the_next_waiter_gets_it() {
    let broker = Broker::start().await;
    let client = Client::connect(&broker.addr).await.unwrap();
    let first = client.lease("a").acquire().await.unwrap();
    let (tx, mut positions) = mpsc::unbounded_channel();
    let second = tokio::spawn(
        client
            .lease("b")
            .on_queued(move |queued| {
                let _ = tx.send(queued.position);
            })
            .acquire(),
    );
    assert_eq!(next(&mut positions).await, 1);
    drop(first);
    let second = tokio::time::timeout(PATIENCE, second)
        .await
        .expect("granted in time")
        .unwrap()
        .unwrap();
    assert_eq!(second.token(), 2);
    // A release, not a lost holder: no lock-delay for the next one.
    let ended = ended(&broker).await;
    assert_eq!((ended.released, ended.disconnected), (1, 0), "{ended:?}");
    drop(second);
    assert_idle(&broker).await;
}

#[tokio::test]
async fn dropping_acquire_withdraws_the_request() {
    let broker = Broker::start().await;
    let client = Client::connect(&broker.addr).await.unwrap();
    let holder = client.lease("holder").acquire().await.unwrap();
    let (tx, mut positions) = mpsc::unbounded_channel();
    let mut waiting = Box::pin(
        client
            .lease("waiter")
            .on_queued(move |queued| {
                let _ = tx.send(queued.position);
            })
            .acquire(),
    );
    tokio::select! {
        result = &mut waiting => panic!("granted while held: {result:?}"),
        position = next(&mut positions) => assert_eq!(position, 1),
    }
    drop(waiting);
    let status = broker
        .wait_for("the waiter withdrawn", |s| {
            s.queue_depth == 0 && s.ended.as_ref().is_some_and(|e| e.withdrawn == 1)
        })
        .await;
    assert_eq!(status.in_flight, 1);
    holder.release().await.unwrap();
    assert_idle(&broker).await;
    assert_eq!(broker.status().await.total_grants, 1);
}

#[tokio::test]
async fn max_wait_ends_acquire_with_deadline_exceeded() {
    let broker = Broker::start().await;
    let client = Client::connect(&broker.addr).await.unwrap();
    let _holder = client.lease("holder").acquire().await.unwrap();
    let error = client
        .lease("impatient")
        .max_wait(Duration::from_millis(100))
        .acquire()
        .await
        .unwrap_err();
    assert_status(error, Code::DeadlineExceeded);
}

#[tokio::test]
async fn an_invalid_request_is_the_brokers_status() {
    let broker = Broker::start().await;
    let error = Client::connect(&broker.addr)
        .await
        .unwrap()
        .lease("not a name!")
        .acquire()
        .await
        .unwrap_err();
    assert_status(error, Code::InvalidArgument);
}

#[tokio::test]
async fn lost_says_why_an_operator_revoked_the_lease_over_the_unix_socket() {
    let broker = Broker::start_with(Options {
        socket: true,
        ..Options::default()
    })
    .await;
    let socket = format!("unix:{}", broker.socket.as_ref().unwrap().display());
    let mut client = Client::connect(&socket).await.unwrap();
    let lease = client.lease("mvoice").acquire().await.unwrap();
    let response = client
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: lease.lease_id().to_owned(),
            message: "maintenance".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.revoked, "{response:?}");
    let lost = tokio::time::timeout(PATIENCE, lease.lost())
        .await
        .expect("lost in time");
    match &lost {
        Lost::Revoked { reason, message } => {
            assert_eq!(*reason, pb::RevokeReason::Admin);
            assert!(message.contains("maintenance"), "{message}");
        }
        other => panic!("expected a revoke, got {other:?}"),
    }
    assert!(!lease.is_held());
    // Asked again, it says the same; releasing a lost lease says it was lost.
    assert_eq!(lease.lost().await.to_string(), lost.to_string());
    match lease.release().await {
        Err(Error::Lost(Lost::Revoked { .. })) => {}
        other => panic!("expected Error::Lost, got {other:?}"),
    }
    let ended = ended(&broker).await;
    assert_eq!((ended.revoked, ended.released), (1, 0), "{ended:?}");
}

#[tokio::test]
async fn lost_resolves_when_the_broker_dies() {
    let mut broker = Broker::start().await;
    let lease = Client::connect(&broker.addr)
        .await
        .unwrap()
        .lease("mvoice")
        .acquire()
        .await
        .unwrap();
    broker.child.start_kill().unwrap();
    let lost = tokio::time::timeout(PATIENCE, lease.lost())
        .await
        .expect("lost in time");
    assert!(matches!(lost, Lost::Failed(_) | Lost::Ended), "{lost:?}");
}

#[tokio::test]
async fn a_preemptible_holder_hears_preempt_requested_and_makes_way() {
    let broker = Broker::start_with(Options {
        config: Some(crate::sharing::PREEMPTION),
        ..Options::default()
    })
    .await;
    let client = Client::connect(&broker.addr).await.unwrap();
    let (tx, mut asked) = mpsc::unbounded_channel();
    let train = client
        .lease("train")
        .on_preempt_requested(move |request| {
            let _ = tx.send(request.clone());
        })
        .acquire()
        .await
        .unwrap();
    let tts = tokio::spawn(client.lease("tts").acquire());
    let request = next(&mut asked).await;
    assert_eq!(request.for_consumer, "tts");
    assert!(
        request.grace_ms > 0 && request.grace_ms <= 30_000,
        "{request:?}"
    );
    assert!(train.is_held());
    train.release().await.unwrap();
    let tts = tokio::time::timeout(PATIENCE, tts)
        .await
        .expect("granted in time")
        .unwrap()
        .unwrap();
    assert_eq!(tts.token(), 2);
    tts.release().await.unwrap();
    let ended = ended(&broker).await;
    assert_eq!((ended.released, ended.revoked), (2, 0), "{ended:?}");
}
