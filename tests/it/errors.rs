//! Bad input gets a clear status and leaves no permit or queue slot behind.

use gpulease_client::pb::v1 as pb;
use gpulease_client::pb::v1::lease_request::Kind as RequestKind;
use tonic::Code;

use crate::support::{Broker, Call, Options, acquire, assert_idle};

async fn refused(broker: &Broker, first: Vec<RequestKind>) -> (Code, String) {
    match Call::open_with(broker, first).await {
        Err(status) => (status.code(), status.message().to_owned()),
        Ok(mut call) => match call.next().await {
            Err(status) => (status.code(), status.message().to_owned()),
            other => panic!("expected an error, got {other:?}"),
        },
    }
}

#[tokio::test]
async fn a_first_message_other_than_acquire_is_invalid() {
    let broker = Broker::start().await;
    let (code, message) = refused(&broker, vec![RequestKind::Release(pb::Release {})]).await;
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("first message"), "{message}");
    let (code, _) = refused(&broker, vec![]).await;
    assert_eq!(code, Code::InvalidArgument);
    assert_idle(&broker).await;
}

#[tokio::test]
async fn bad_consumer_names_are_invalid() {
    let broker = Broker::start().await;
    let long = "x".repeat(65);
    for (name, expected) in [
        ("", "empty"),
        (long.as_str(), "65 characters"),
        ("ollama llm", "' '"),
        ("tts/1", "'/'"),
    ] {
        let (code, message) = refused(&broker, vec![RequestKind::Acquire(acquire(name))]).await;
        assert_eq!(code, Code::InvalidArgument, "{name:?}");
        assert!(message.contains(expected), "{name:?}: {message}");
    }
    assert_idle(&broker).await;
    assert_eq!(broker.status().await.consumers.len(), 0);
}

#[tokio::test]
async fn a_second_acquire_is_invalid_and_ends_the_wait_or_the_lease() {
    let broker = Broker::start().await;
    let mut holder = Call::open(&broker, acquire("holder")).await.unwrap();
    holder.granted().await;
    let mut waiter = Call::open(&broker, acquire("waiter")).await.unwrap();
    waiter.queued().await;

    waiter.send(RequestKind::Acquire(acquire("waiter"))).await;
    assert!(
        waiter
            .ends_with(Code::InvalidArgument)
            .await
            .contains("only `release`")
    );
    holder.send(RequestKind::Acquire(acquire("holder"))).await;
    holder.ends_with(Code::InvalidArgument).await;

    assert_idle(&broker).await;
    assert_eq!(broker.status().await.total_grants, 1);
}

#[tokio::test]
async fn strangers_are_refused_under_strict_mode() {
    let broker = Broker::start_with(Options {
        config: Some("strict_consumers = true\n[consumers.mvoice]\nkind = \"tts\"\n"),
        ..Options::default()
    })
    .await;
    let (code, message) = refused(&broker, vec![RequestKind::Acquire(acquire("ollama"))]).await;
    assert_eq!(code, Code::PermissionDenied);
    assert!(message.contains("ollama"), "{message}");
    Call::open(&broker, acquire("mvoice"))
        .await
        .unwrap()
        .granted()
        .await;
}

#[tokio::test]
async fn max_wait_expires_with_deadline_exceeded_and_frees_the_slot() {
    let broker = Broker::start().await;
    let mut holder = Call::open(&broker, acquire("holder")).await.unwrap();
    holder.granted().await;
    let mut request = acquire("impatient");
    request.max_wait_ms = 100;
    let mut impatient = Call::open(&broker, request).await.unwrap();
    assert!(
        impatient
            .ends_with(Code::DeadlineExceeded)
            .await
            .contains("100 ms")
    );
    // Gone from the queue at once: the status right after shows no waiter.
    let status = broker.status().await;
    assert_eq!(status.queue_depth, 0);
    assert_eq!(status.ended.unwrap().expired, 1);
    holder.release().await;
    assert_idle(&broker).await;
    assert_eq!(broker.status().await.total_grants, 1);
}

#[tokio::test]
async fn a_cancelled_waiter_leaves_at_once_and_is_never_granted() {
    crate::leases::waiter_leaves_and_is_never_granted(async |waiter: Call| drop(waiter)).await;
}

#[tokio::test]
async fn max_hold_revokes_the_lease() {
    let broker = Broker::with_env(&[("GPULEASE__MAX_HOLD", "200ms")]).await;
    let mut call = Call::open(&broker, acquire("greedy")).await.unwrap();
    call.granted().await;
    match call.next().await {
        Ok(Some(pb::lease_event::Kind::Revoked(revoked))) => {
            assert_eq!(revoked.reason(), pb::RevokeReason::MaxHoldExceeded);
        }
        other => panic!("expected Revoked, got {other:?}"),
    }
    call.ends_with(Code::Aborted).await;
    assert_idle(&broker).await;
    assert_eq!(broker.status().await.ended.unwrap().revoked, 1);
}
