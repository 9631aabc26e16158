//! Status, WatchStatus, health checking, and the Unix socket.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};

use gpulease_client::pb::v1 as pb;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::support::{Broker, Call, Options, acquire};

#[tokio::test]
async fn watch_status_reflects_every_transition() {
    let broker = Broker::start_with(Options {
        config: Some("[consumers.mvoice]\nkind = \"tts\"\nvram_mib = 3000\ncoexist = true\n"),
        ..Options::default()
    })
    .await;
    let mut client = broker.client().await;
    let mut snapshots = client
        .watch_status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut next_matching = async |what: &str, done: &dyn Fn(&pb::StatusResponse) -> bool| {
        loop {
            let snapshot = tokio::time::timeout(crate::support::PATIENCE, snapshots.message())
                .await
                .unwrap_or_else(|_| panic!("no snapshot with {what}"))
                .unwrap()
                .unwrap();
            if done(&snapshot) {
                return snapshot;
            }
        }
    };

    let first = next_matching("the first snapshot", &|_| true).await;
    assert_eq!(
        (first.capacity, first.in_flight, first.queue_depth),
        (1, 0, 0)
    );
    let mvoice = &first.consumers[0];
    assert_eq!(mvoice.name, "mvoice");
    assert_eq!(mvoice.kind(), pb::ConsumerKind::Tts);
    assert!(mvoice.configured && mvoice.coexist);
    assert_eq!(mvoice.vram_mib, 3000);

    let mut holder = Call::open(&broker, acquire("mvoice")).await.unwrap();
    holder.granted().await;
    let held = next_matching("a holder", &|s| s.in_flight == 1).await;
    assert_eq!(held.holders[0].consumer, "mvoice");
    assert!(held.consumers[0].holding);

    let mut waiter = Call::open(&broker, acquire("comfyui")).await.unwrap();
    waiter.queued().await;
    let queued = next_matching("a waiter", &|s| s.queue_depth == 1).await;
    assert_eq!(queued.waiters[0].consumer, "comfyui");
    assert_eq!(queued.waiters[0].position, 1);

    holder.release().await;
    waiter.granted().await;
    let handed = next_matching("the hand-over", &|s| {
        s.holders.first().is_some_and(|h| h.consumer == "comfyui")
    })
    .await;
    assert_eq!((handed.queue_depth, handed.total_grants), (0, 2));
    assert_eq!(handed.ended.unwrap().released, 1);
    let comfyui = handed
        .consumers
        .iter()
        .find(|c| c.name == "comfyui")
        .unwrap();
    assert!(!comfyui.configured && comfyui.holding);
    assert_eq!(comfyui.grants, 1);

    waiter.release().await;
    let idle = next_matching("idle again", &|s| s.in_flight == 0).await;
    assert_eq!(idle.total_grants, 2);
    assert_eq!(idle.oldest_queued_ms, 0);
}

#[tokio::test]
async fn health_reports_serving() {
    let broker = Broker::start().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", broker.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "gpulease.v1.LeaseBroker"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "{service:?}");
    }
}

#[tokio::test]
async fn the_unix_socket_serves_with_mode_0660() {
    let broker = Broker::start_with(Options {
        socket: true,
        ..Options::default()
    })
    .await;
    let socket = broker.socket.clone().unwrap();
    let metadata = std::fs::metadata(&socket).unwrap();
    assert!(metadata.file_type().is_socket());
    assert_eq!(metadata.permissions().mode() & 0o777, 0o660);
    let address = format!("unix:{}", socket.display());
    let mut client = gpulease_client::connect(&address).await.unwrap();
    let status = client
        .status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.capacity, 1);
}
