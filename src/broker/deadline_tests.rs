//! The broker's own deadlines in virtual time (`tokio::time::pause`): the
//! memory poller must wake for a deadline that a change brings forward, not
//! only at its next poll.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Broker, Lease};
use crate::config::Config;
use crate::core::{LeaseEnd, Request, RevokeReason};
use crate::inventory::StaticInventory;
use crate::state::StateFile;

/// A broker on `config` (TOML) over one GPU of unknown size, with its state
/// in `dir`.
fn broker(config: &str, dir: &tempfile::TempDir) -> Arc<Broker> {
    let path = dir.path().join("gpulease.toml");
    std::fs::write(&path, config).unwrap();
    let config = Config::load(Some(&path), Some(Default::default())).unwrap();
    let (state, persisted) = StateFile::open(&dir.path().join("state")).unwrap();
    let claim = Broker::claim(&state, persisted).unwrap();
    Broker::start(&config, Arc::new(StaticInventory::new(&[])), state, claim)
}

async fn lease(broker: &Arc<Broker>, consumer: &str) -> Lease {
    let request = Request {
        consumer: consumer.into(),
        ..Request::default()
    };
    let mut ticket = broker.enqueue(request).unwrap();
    ticket.granted().await.expect("granted")
}

/// The poll is an hour apart, so only the deadlines themselves can wake
/// the broker in time.
const PREEMPTION: &str = r#"
[gpu]
poll_interval = "1h"
[scheduling]
preempt_after = "5s"
[consumers.train]
preemptible = true
preempt_grace = "10s"
[consumers.tts]
priority = 10
"#;

#[tokio::test(start_paused = true)]
async fn a_preemptible_holder_is_asked_at_preempt_after_and_revoked_at_its_grace() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(PREEMPTION, &dir);
    let train = lease(&broker, "train").await;
    let start = Instant::now();
    let waiter = tokio::spawn({
        let broker = Arc::clone(&broker);
        async move { lease(&broker, "tts").await }
    });

    train.revocation().preempt_requested().await;
    let asked = start.elapsed();
    assert!(
        asked >= Duration::from_secs(5) && asked < Duration::from_millis(5_300),
        "asked after {asked:?}"
    );
    let notice = train.revocation().preempt_notice().unwrap();
    assert_eq!(notice.for_consumer, "tts");
    assert_eq!(notice.grace, Duration::from_secs(10));

    train.revocation().fired().await;
    let revoked = start.elapsed();
    assert!(
        revoked >= Duration::from_secs(15) && revoked < Duration::from_millis(15_300),
        "revoked after {revoked:?}"
    );
    assert_eq!(train.revocation().reason().0, RevokeReason::Preempted);
    train.end(LeaseEnd::Revoked(RevokeReason::Preempted));
    let tts = waiter.await.unwrap();
    assert_eq!(tts.grant().token.0, 2);
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_releases_within_its_grace_keeps_its_end_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(PREEMPTION, &dir);
    let train = lease(&broker, "train").await;
    let waiter = tokio::spawn({
        let broker = Arc::clone(&broker);
        async move { lease(&broker, "tts").await }
    });
    train.revocation().preempt_requested().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let revocation = Arc::clone(&train.grant().revocation);
    train.end(LeaseEnd::Released);
    let tts = waiter.await.unwrap();
    // Long past the grace: the released lease was never revoked.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!revocation.fired.is_cancelled());
    let ended = broker.status_listing(usize::MAX).core.ended;
    assert_eq!((ended.released, ended.revoked), (1, 0));
    tts.end(LeaseEnd::Released);
}
