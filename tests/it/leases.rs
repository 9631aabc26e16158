//! Granting, holding and releasing leases.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use gpulease_client::pb::v1 as pb;
use gpulease_client::pb::v1::lease_request::Kind as RequestKind;
use tokio::sync::Mutex;

use crate::support::{Broker, Call, acquire, assert_idle};

/// Eight clients take turns for many rounds; their own shared counter of
/// holders never exceeds the capacity, and every grant has a new token.
async fn hammer(capacity: usize) {
    const CLIENTS: usize = 8;
    const ROUNDS: usize = 25;
    let cap = capacity.to_string();
    let broker = Arc::new(Broker::with_env(&[("GPULEASE__CAPACITY", &cap)]).await);
    let holders = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let (broker, holders, most, tokens) = (
            Arc::clone(&broker),
            Arc::clone(&holders),
            Arc::clone(&most),
            Arc::clone(&tokens),
        );
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let mut call = Call::open(&broker, acquire(&format!("client-{client}")))
                    .await
                    .unwrap();
                let granted = call.granted().await;
                let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokens.lock().await.push(granted.fencing_token);
                tokio::task::yield_now().await;
                holders.fetch_sub(1, Ordering::SeqCst);
                call.release().await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let most = most.load(Ordering::SeqCst);
    assert!(
        most <= capacity,
        "{most} holders at once with capacity {capacity}"
    );
    let mut tokens = tokens.lock().await.clone();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(
        tokens.len(),
        CLIENTS * ROUNDS,
        "a fencing token was handed out twice"
    );
    let status = broker.status().await;
    assert_eq!(status.total_grants, (CLIENTS * ROUNDS) as u64);
    assert_eq!(status.ended.unwrap().released, (CLIENTS * ROUNDS) as u64);
    assert_idle(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_clients_never_overlap_at_capacity_one() {
    hammer(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_clients_stay_within_capacity_three() {
    hammer(3).await;
}

#[tokio::test]
async fn waiters_are_granted_in_arrival_order_with_increasing_tokens() {
    let broker = Broker::start().await;
    let mut first = Call::open(&broker, acquire("first")).await.unwrap();
    let granted = first.granted().await;
    assert!(
        granted
            .lease_id
            .ends_with(&format!("-{}", granted.fencing_token))
    );
    assert_eq!(
        granted.broker_epoch,
        broker.status().await.broker.unwrap().epoch
    );

    let mut waiting = Vec::new();
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        let mut call = Call::open(&broker, acquire(name)).await.unwrap();
        let queued = call.queued().await;
        assert_eq!(
            (queued.position, queued.queue_depth),
            (i as u32 + 1, i as u32 + 1)
        );
        assert_eq!(queued.holders[0].consumer, "first");
        waiting.push(call);
    }
    first.release().await;
    let mut last = granted.fencing_token;
    for call in &mut waiting {
        let granted = call.granted().await;
        assert!(granted.fencing_token > last);
        last = granted.fencing_token;
        // Only one holder at a time: the next waiter is not granted yet.
        let status = broker.status().await;
        assert_eq!(status.in_flight, 1);
        assert_eq!(status.holders[0].fencing_token, granted.fencing_token);
        call.send(RequestKind::Release(pb::Release {})).await;
        assert!(matches!(call.next().await, Ok(None)));
    }
    assert_idle(&broker).await;
}

#[tokio::test]
async fn a_half_close_releases_the_lease() {
    let broker = Broker::start().await;
    let mut call = Call::open(&broker, acquire("grpcurl-like")).await.unwrap();
    call.granted().await;
    // Dropping the request sender half-closes the client's side.
    call.requests = None;
    assert!(matches!(call.next().await, Ok(None)));
    assert_idle(&broker).await;
    assert_eq!(broker.status().await.ended.unwrap().half_closed, 1);
}

/// A waiter behind a holder leaves the queue by `leave`; it is gone from
/// Status at once, and the holder's release grants nobody.
pub(crate) async fn waiter_leaves_and_is_never_granted(leave: impl AsyncFnOnce(Call)) {
    let broker = Broker::start().await;
    let mut holder = Call::open(&broker, acquire("holder")).await.unwrap();
    holder.granted().await;
    let mut waiter = Call::open(&broker, acquire("waiter")).await.unwrap();
    waiter.queued().await;
    leave(waiter).await;
    broker
        .wait_for("the waiter gone", |s| s.queue_depth == 0)
        .await;
    holder.release().await;
    assert_idle(&broker).await;
    let status = broker.status().await;
    assert_eq!(status.total_grants, 1);
    assert_eq!(status.ended.unwrap().withdrawn, 1);
}

#[tokio::test]
async fn release_before_the_grant_stops_waiting() {
    waiter_leaves_and_is_never_granted(async |mut waiter: Call| {
        waiter.send(RequestKind::Release(pb::Release {})).await;
        assert!(matches!(waiter.next().await, Ok(None)));
    })
    .await;
}

#[tokio::test]
async fn waiters_hear_when_their_position_improves() {
    let broker = Broker::start().await;
    let mut holder = Call::open(&broker, acquire("holder")).await.unwrap();
    holder.granted().await;
    let mut second = Call::open(&broker, acquire("second")).await.unwrap();
    assert_eq!(second.queued().await.position, 1);
    let mut third = Call::open(&broker, acquire("third")).await.unwrap();
    assert_eq!(third.queued().await.position, 2);
    drop(second);
    let update = third.queued().await;
    assert_eq!((update.position, update.queue_depth), (1, 1));
    holder.release().await;
    third.granted().await;
}

#[tokio::test]
async fn labels_and_pids_show_in_status() {
    let broker = Broker::start().await;
    let mut request = acquire("comfyui");
    request.vram_mib = 12_000;
    let worker = crate::support::Worker::start();
    request.client_pid = worker.pid();
    request.labels.insert("job".into(), "render-7".into());
    let mut call = Call::open(&broker, request).await.unwrap();
    let granted = call.granted().await;
    let status = broker.status().await;
    let holder = &status.holders[0];
    assert_eq!(holder.lease_id, granted.lease_id);
    assert_eq!((holder.vram_mib, holder.client_pid), (12_000, worker.pid()));
    assert_eq!(holder.attribution, "checked_hint");
    assert_eq!(holder.labels["job"], "render-7");
    call.release().await;
}
