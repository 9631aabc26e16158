//! Tests of the scheduling core: scenario scripts, then a property test that
//! runs random interleavings against a simple model.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::script::check;
use super::*;

#[test]
fn first_come_first_served() {
    check(
        "
        manual
        +a
        +b
        +c
        grant
        wait 10ms
        release #1
        grant
        wait 5ms
        release #2
        grant
        ",
        "
        queued a at 1
        queued b at 2
        queued c at 3
        granted a token=1 waited=0ms
        ended a token=1 held=10ms
        granted b token=2 waited=10ms
        ended b token=2 held=5ms
        granted c token=3 waited=15ms
        ",
    );
}

#[test]
fn capacity_bounds_the_holders() {
    check(
        "
        manual
        cap 2
        +a
        +b
        +c
        grant
        grant
        drop #2
        grant
        ",
        "
        queued a at 1
        queued b at 2
        queued c at 3
        granted a token=1 waited=0ms
        granted b token=2 waited=0ms
        ended b token=2 held=0ms
        granted c token=3 waited=0ms
        ",
    );
}

#[test]
fn withdrawn_and_expired_waiters_are_never_granted() {
    check(
        "
        manual
        +a
        +b
        +c
        +d
        grant
        -b
        expire c
        release #1
        grant
        stats
        ",
        "
        queued a at 1
        queued b at 2
        queued c at 3
        queued d at 4
        granted a token=1 waited=0ms
        withdrew b
        withdrew c
        ended a token=1 held=0ms
        granted d token=2 waited=0ms
        in_flight=1 queue=0 grants=2 last_wait=0ms last_hold=0ms oldest=0ms EndCounts { released: 1, half_closed: 0, disconnected: 0, revoked: 0, withdrawn: 1, unclaimed: 0, expired: 1 }
        ",
    );
}

#[test]
fn a_grant_nobody_took_is_counted_as_unclaimed_not_withdrawn() {
    check(
        "
        manual
        +a
        grant
        unclaimed #1
        +b
        -b
        stats
        ",
        "
        queued a at 1
        granted a token=1 waited=0ms
        ended a token=1 held=0ms
        queued b at 1
        withdrew b
        in_flight=0 queue=0 grants=1 last_wait=0ms last_hold=0ms oldest=0ms EndCounts { released: 0, half_closed: 0, disconnected: 0, revoked: 0, withdrawn: 1, unclaimed: 1, expired: 0 }
        ",
    );
}

#[test]
fn ending_twice_and_withdrawing_after_the_grant_change_nothing() {
    check(
        "
        manual
        +a
        grant
        -a
        release #1
        release #1
        revoke #1
        stats
        ",
        "
        queued a at 1
        granted a token=1 waited=0ms
        a not waiting
        ended a token=1 held=0ms
        token=1 not held
        token=1 not held
        in_flight=0 queue=0 grants=1 last_wait=0ms last_hold=0ms oldest=0ms EndCounts { released: 1, half_closed: 0, disconnected: 0, revoked: 0, withdrawn: 0, unclaimed: 0, expired: 0 }
        ",
    );
}

#[test]
fn statistics_follow_the_clock() {
    check(
        "
        manual
        +a
        grant
        wait 100ms
        +b
        wait 50ms
        stats
        halfclose #1
        grant
        wait 20ms
        stats
        ",
        "
        queued a at 1
        granted a token=1 waited=0ms
        queued b at 1
        in_flight=1 queue=1 grants=1 last_wait=0ms last_hold=0ms oldest=50ms EndCounts { released: 0, half_closed: 0, disconnected: 0, revoked: 0, withdrawn: 0, unclaimed: 0, expired: 0 }
        ended a token=1 held=150ms
        granted b token=2 waited=50ms
        in_flight=1 queue=0 grants=2 last_wait=50ms last_hold=150ms oldest=0ms EndCounts { released: 0, half_closed: 1, disconnected: 0, revoked: 0, withdrawn: 0, unclaimed: 0, expired: 0 }
        ",
    );
}

#[test]
fn bad_names_and_strangers_under_strict_mode_are_rejected() {
    check(
        "
        manual
        strict
        consumer tts
        +tts
        +llm
        +bad/name
        ",
        r#"
        queued tts at 1
        rejected "llm": consumer "llm" is not in the broker's configuration and strict_consumers is on
        rejected "bad/name": consumer name has '/'; only [A-Za-z0-9._-] is allowed
        "#,
    );
}

#[test]
fn consumer_names() {
    assert_eq!(validate_consumer_name("mvoice-2.tts_x"), Ok(()));
    assert_eq!(validate_consumer_name(""), Err(ConsumerNameError::Empty));
    assert_eq!(validate_consumer_name(&"a".repeat(64)), Ok(()));
    assert_eq!(
        validate_consumer_name(&"a".repeat(65)),
        Err(ConsumerNameError::TooLong(65))
    );
    assert_eq!(
        validate_consumer_name("ollama llm"),
        Err(ConsumerNameError::BadChar(' '))
    );
    assert_eq!(
        validate_consumer_name("é"),
        Err(ConsumerNameError::BadChar('é'))
    );
}

#[test]
fn consumers_record_activity() {
    let start = Instant::now();
    let profile = ConsumerProfile {
        vram_mib: 3000,
        coexist: true,
        ..ConsumerProfile::new("tts", ConsumerKind::Tts)
    };
    let mut sched: Scheduler<()> = Scheduler::single(1, false, [profile.clone()]);
    let ask = |name: &str| Request {
        consumer: name.into(),
        ..Request::default()
    };
    sched.enqueue(ask("tts"), (), start).unwrap();
    sched.enqueue(ask("other"), (), start).unwrap();
    let grants = sched.grant_ready(start + Duration::from_millis(5)).grants;
    assert_eq!(grants.len(), 1);
    let snapshot = sched.snapshot(start + Duration::from_millis(7));
    let names: Vec<_> = snapshot.consumers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["other", "tts"]);
    let tts = &snapshot.consumers[1];
    assert_eq!(tts.profile.as_ref(), Some(&profile));
    assert_eq!((tts.grants, tts.holding, tts.waiting), (1, 1, 0));
    assert_eq!(
        tts.idle_for(start + Duration::from_millis(7)),
        Some(Duration::from_millis(2))
    );
    let other = &snapshot.consumers[0];
    assert_eq!((other.grants, other.holding, other.waiting), (0, 0, 1));
    assert_eq!(other.profile, None);
}

#[test]
fn strangers_are_forgotten_beyond_the_limit_but_the_busy_are_kept() {
    let now = Instant::now();
    let mut sched: Scheduler<()> = Scheduler::single(1, false, []);
    let busy = Request {
        consumer: "busy".into(),
        ..Request::default()
    };
    sched.enqueue(busy, (), now).unwrap();
    for i in 0..consumers::MAX_UNCONFIGURED * 2 {
        let request = Request {
            consumer: format!("c{i}"),
            ..Request::default()
        };
        let (id, _, _) = sched
            .enqueue(request, (), now + Duration::from_millis(i as u64 + 1))
            .unwrap();
        sched.withdraw(id, Withdrawal::Withdrawn, now);
    }
    let records = sched.snapshot(now).consumers;
    assert!(
        records.len() <= consumers::MAX_UNCONFIGURED,
        "{} records",
        records.len()
    );
    assert!(
        records.iter().any(|r| r.name == "busy"),
        "a waiting consumer was forgotten"
    );
}

#[test]
fn a_burst_of_strangers_shrinks_back_to_the_limit() {
    let now = Instant::now();
    let mut sched: Scheduler<()> = Scheduler::single(1, false, []);
    let ids: Vec<WaiterId> = (0..consumers::MAX_UNCONFIGURED * 3)
        .map(|i| {
            let request = Request {
                consumer: format!("s{i}"),
                ..Request::default()
            };
            sched.enqueue(request, (), now).unwrap().0
        })
        .collect();
    assert_eq!(
        sched.snapshot(now).consumers.len(),
        consumers::MAX_UNCONFIGURED * 3
    );
    for id in ids {
        sched.withdraw(id, Withdrawal::Withdrawn, now);
    }
    assert_eq!(
        sched.snapshot(now).consumers.len(),
        consumers::MAX_UNCONFIGURED
    );
}

#[test]
fn positions_follow_the_queue() {
    let now = Instant::now();
    let mut sched: Scheduler<&str> = Scheduler::single(1, false, []);
    let mut ids = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let request = Request {
            consumer: name.into(),
            ..Request::default()
        };
        ids.push(sched.enqueue(request, name, now).unwrap().0);
    }
    sched.grant_ready(now);
    sched.withdraw(ids[2], Withdrawal::Withdrawn, now);
    let mut seen = Vec::new();
    sched.for_each_waiter(None, now, |place, name| seen.push((place.position, *name)));
    let mut first = Vec::new();
    sched.for_each_waiter(Some(1), now, |place, name| {
        first.push((place.position, *name))
    });
    assert_eq!(first, [(1, "b")]);
    assert_eq!(seen, [(1, "b"), (2, "d")]);
    let drained = sched.drain_waiters(now);
    assert_eq!(drained, ["b", "d"]);
    assert_eq!(sched.queue_depth(), 0);
}

/// One step of a random interleaving.
#[derive(Clone, Debug)]
enum Op {
    Enqueue(u8),
    /// Withdraw the n-th request ever enqueued (modulo), waiting or not.
    Withdraw(usize, bool),
    /// End the n-th grant ever made (modulo), held or not.
    End(usize, u8),
    Grant,
    Wait(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..4).prop_map(Op::Enqueue),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(n, e)| Op::Withdraw(n, e)),
        2 => (any::<usize>(), 0u8..4).prop_map(|(n, how)| Op::End(n, how)),
        3 => Just(Op::Grant),
        1 => (0u16..500).prop_map(Op::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The core against a model: a FIFO list of live waiters and a set of
    /// held tokens.
    #[test]
    fn random_interleavings_keep_the_invariants(
        capacity in 1usize..4,
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        let start = Instant::now();
        let mut now = start;
        // Each waiter's payload is its index in `enqueued`.
        let mut sched: Scheduler<usize> = Scheduler::single(capacity, false, []);
        let mut model_queue: VecDeque<WaiterId> = VecDeque::new();
        let mut model_held: BTreeSet<FencingToken> = BTreeSet::new();
        let mut gone: BTreeSet<WaiterId> = BTreeSet::new();
        let mut enqueued: Vec<WaiterId> = Vec::new();
        let mut granted: Vec<FencingToken> = Vec::new();
        let mut last_token = 0;
        let (mut grants, mut ends, mut withdrawals) = (0u64, 0u64, 0u64);

        for op in ops {
            match op {
                Op::Enqueue(c) => {
                    let request = Request { consumer: format!("c{c}"), ..Request::default() };
                    let (id, _, position) = sched.enqueue(request, enqueued.len(), now).unwrap();
                    model_queue.push_back(id);
                    enqueued.push(id);
                    prop_assert_eq!(position as usize, model_queue.len());
                }
                Op::Withdraw(n, expired) if !enqueued.is_empty() => {
                    let id = enqueued[n % enqueued.len()];
                    let how = if expired { Withdrawal::Expired } else { Withdrawal::Withdrawn };
                    let was_waiting = model_queue.contains(&id);
                    let payload = sched.withdraw(id, how, now);
                    prop_assert_eq!(payload.is_some(), was_waiting, "withdraw {:?}", id);
                    if let Some(payload) = payload {
                        prop_assert_eq!(enqueued[payload], id);
                        model_queue.retain(|w| *w != id);
                        gone.insert(id);
                        withdrawals += 1;
                    }
                }
                Op::End(n, how) if !granted.is_empty() => {
                    let token = granted[n % granted.len()];
                    let how = match how {
                        0 => LeaseEnd::Released,
                        1 => LeaseEnd::HalfClosed,
                        2 => LeaseEnd::Disconnected,
                        _ => LeaseEnd::Revoked(RevokeReason::MaxHoldExceeded),
                    };
                    let ended = sched.end(token, how, now);
                    prop_assert_eq!(ended.is_some(), model_held.remove(&token), "end {:?}", token);
                    if ended.is_some() {
                        ends += 1;
                    }
                }
                Op::Grant => {
                    for grant in sched.grant_ready(now).grants {
                        prop_assert!(!gone.contains(&grant.waiter), "granted a gone waiter");
                        prop_assert_eq!(Some(grant.waiter), model_queue.pop_front(), "not FIFO");
                        prop_assert_eq!(enqueued[grant.payload], grant.waiter);
                        prop_assert!(grant.token.0 > last_token, "token went backwards");
                        last_token = grant.token.0;
                        model_held.insert(grant.token);
                        granted.push(grant.token);
                        grants += 1;
                    }
                    // Work-conserving: after granting, either every permit
                    // is taken or nobody waits.
                    prop_assert!(model_held.len() == capacity || model_queue.is_empty());
                }
                Op::Wait(ms) => now += Duration::from_millis(u64::from(ms)),
                Op::Withdraw(..) | Op::End(..) => {}
            }
            prop_assert!(sched.in_flight() <= capacity);
            prop_assert_eq!(sched.in_flight(), model_held.len());
            prop_assert_eq!(sched.queue_depth(), model_queue.len());

            let snapshot = sched.snapshot(now);
            prop_assert_eq!(snapshot.total_grants, grants);
            let e = snapshot.ended;
            prop_assert_eq!(e.released + e.half_closed + e.disconnected + e.revoked, ends);
            prop_assert_eq!(e.withdrawn + e.expired, withdrawals);
            let order: Vec<u32> = snapshot.waiters.iter().map(|w| w.position).collect();
            prop_assert_eq!(order, (1..=model_queue.len() as u32).collect::<Vec<_>>());
            let waiting: u32 = snapshot.consumers.iter().map(|c| c.waiting).sum();
            let holding: u32 = snapshot.consumers.iter().map(|c| c.holding).sum();
            prop_assert_eq!(waiting as usize, model_queue.len());
            prop_assert_eq!(holding as usize, model_held.len());
            prop_assert_eq!(
                snapshot.consumers.iter().map(|c| c.grants).sum::<u64>(),
                grants
            );
        }
    }
}
