//! Scenario scripts for sharing one card: memory accounting on readings,
//! backfill and the reservation, priorities and aging, eviction order, and
//! preemption; then a property test of backfill and priorities against a
//! model.

use std::time::{Duration, Instant};

use super::script::{GIB, check, gpu};
use super::*;

/// The replay's card: a TTS service that may coexist, an LLM server and an
/// image generator that keep their models and unload when asked, and a
/// training job.
const SHARED_CARD: &str = "
    card 24
    cap 4
    consumer tts vram=3 coexist
    consumer llm vram=10 unload
    consumer image vram=8 unload
    consumer train
";

#[test]
fn backfill_beside_a_head_blocked_on_memory_then_its_reservation() {
    check(
        &format!(
            "{SHARED_CARD}
            consumer asr
            +train 16
            +image 18
            +tts 4
            +asr 4
            show
            release train
            show
            +tts 4
            release asr
            show
            "
        ),
        "
        queued train at 1
        granted train
        queued image at 1
        queued tts at 2
        granted tts
        queued asr at 2
        granted asr
        queue: image(0) | needs 18432 MiB, 0 MiB free; waiting for the holders
        ended train
        queue: image(0) | reserved: image | needs 18432 MiB, 16384 MiB free; waiting for the holders
        queued tts at 2
        ended asr
        granted image
        queue: tts(0) | needs 4096 MiB, 2048 MiB free; waiting for the holders
        ",
    );
}

#[test]
fn a_resident_is_no_longer_asked_once_the_waiter_it_was_asked_for_leaves() {
    check(
        "
        card 24
        consumer llm vram=10 unload
        consumer image vram=8 unload
        +llm 10
        release llm
        +image 20
        show
        -image
        show
        ",
        "
        queued llm at 1
        granted llm
        ended llm
        queued image at 1
        unload llm (10G, peak 0G) for image
        queue: image(0) | asked llm to unload; needs 20480 MiB, 14336 MiB free | llm keeps 10G peak 0G (asked to unload)
        withdrew image
        queue: | llm keeps 10G peak 0G
        ",
    );
}

#[test]
fn a_head_waiting_for_a_permit_keeps_it_reserved() {
    check(
        "
        card 24
        cap 2
        consumer llm vram=10 unload
        consumer tts
        consumer asr
        consumer image
        +llm 10
        release llm
        +image 20
        +tts 1
        +asr 1
        unloaded llm
        show
        +tts 1
        release tts
        show
        ",
        "
        queued llm at 1
        granted llm
        ended llm
        queued image at 1
        unload llm (10G, peak 0G) for image
        queued tts at 2
        granted tts
        queued asr at 2
        granted asr
        queue: image(0) | reserved: image | asked llm to unload; needs 20480 MiB, 14336 MiB free
        queued tts at 2
        ended tts
        granted image
        queue: tts(0)
        ",
    );
}

#[test]
fn without_backfill_a_large_head_is_not_overtaken() {
    check(
        &format!(
            "{SHARED_CARD}
            nobackfill
            +train 16
            +image 18
            +tts 4
            release train
            "
        ),
        "
        queued train at 1
        granted train
        queued image at 1
        queued tts at 2
        ended train
        granted image
        granted tts
        ",
    );
}

#[test]
fn higher_priority_first_and_equal_priorities_in_arrival_order() {
    check(
        "
        consumer tts prio=10
        consumer llm prio=5
        +batch
        +llm
        +batch
        +tts
        +llm
        show
        release batch
        release tts
        release llm
        release llm
        ",
        "
        queued batch at 1
        granted batch
        queued llm at 1
        queued batch at 2
        queued tts at 1
        queued llm at 3
        queue: tts(10) llm(5) llm(5) batch(0)
        ended batch
        granted tts
        ended tts
        granted llm
        ended llm
        granted llm
        ended llm
        granted batch
        ",
    );
}

#[test]
fn a_request_may_lower_its_priority_but_never_raise_it() {
    check(
        "
        consumer tts prio=10
        +hold
        +tts prio=3
        +batch prio=50
        +tts prio=-5000
        +tts
        show
        ",
        "
        queued hold at 1
        granted hold
        queued tts at 1
        queued batch at 2
        queued tts at 3
        queued tts at 1
        queue: tts(10) tts(3) batch(0) tts(-1000)
        ",
    );
}

/// A batch job (priority 0) behind a steady stream of TTS requests
/// (priority 3, one every 4 s, each holding 4 s): with aging 10 s its
/// effective priority reaches 3 after 30 s, and the first grant after that
/// is its own, since ties go to the earlier arrival.
#[test]
fn aging_lets_a_low_priority_waiter_through_a_steady_stream() {
    let mut script = String::from(
        "
        cap 1
        aging 10s
        consumer tts prio=3
        +tts
        +batch
        +tts
        ",
    );
    let mut expected = String::from(
        "
        queued tts at 1
        granted tts
        queued batch at 1
        queued tts at 1
        ",
    );
    for round in 1..=8 {
        script.push_str("wait 4s\nrelease tts\n+tts\n");
        expected.push_str("ended tts\n");
        if round < 8 {
            // Before 30 s the TTS waiter is ahead; it is granted and the
            // next one queues ahead of the batch job again.
            expected.push_str("granted tts\nqueued tts at 1\n");
        } else {
            // At 32 s both have 3: the batch job arrived first.
            expected.push_str("granted batch\nqueued tts at 2\n");
        }
    }
    script.push_str("show\n");
    expected.push_str("queue: tts(3) tts(3)\n");
    check(&script, &expected);
}

#[test]
fn idle_residents_are_evicted_lower_priority_first_then_lru() {
    check(
        "
        card 24
        consumer llm vram=10 unload prio=5
        consumer image vram=8 unload
        consumer sd vram=4 unload
        consumer train
        +llm 10
        release llm
        +image 8
        release image
        +sd 4
        release sd
        +train 14
        ",
        "
        queued llm at 1
        granted llm
        ended llm
        queued image at 1
        granted image
        ended image
        queued sd at 1
        granted sd
        ended sd
        queued train at 1
        unload image (8G, peak 0G) for train
        unload sd (4G, peak 0G) for train
        ",
    );
}

/// The replay's over-commit: the image generator's learned peak (model and
/// job) was counted as room for it, although between jobs it holds only its
/// model.
#[test]
fn a_consumer_counts_as_room_only_what_it_holds_now() {
    check(
        "
        card 24 measured
        cap 2
        consumer image vram=8 unload
        consumer train
        read free=24
        +image 14
        read free=10 image=14
        release image
        read free=16 image=8
        +train 15
        read free=1 image=8 train=15
        +image 14
        show
        ",
        "
        queued image at 1
        granted image
        ended image
        queued train at 1
        granted train
        queued image at 1
        queue: image(0) | needs 14336 MiB, 9216 MiB free; waiting for the holders | image keeps 8G peak 14G
        ",
    );
}

/// When a lease ends, its job memory is being freed: the broker reads again
/// before it asks anyone to unload, and here the fresh reading shows room.
#[test]
fn no_unload_is_asked_on_a_reading_from_before_a_lease_ended() {
    check(
        "
        card 24 measured
        cap 2
        margin 0
        consumer llm vram=10 unload
        consumer image vram=8 unload
        read free=24
        +llm 12
        read free=12 llm=12
        release llm
        +image 14
        show
        read free=14 llm=10
        show
        ",
        "
        queued llm at 1
        granted llm
        ended llm
        queued image at 1
        queue: image(0) | reading the GPU's memory after a lease ended | llm keeps 12G peak 12G
        granted image
        queue: | llm keeps 10G peak 12G
        ",
    );
}

/// The benchmark's over-commit (seed 3 and the heavier day). A reading is
/// two NVML calls: the free memory, then the processes. Between them the
/// LLM, just granted, loaded its 10 GiB model: the reading's free memory
/// still counts those 10 GiB as free, and its processes show them as the
/// LLM's, so its promise looked kept. Free memory is never more than what
/// the processes in the same reading leave.
#[test]
fn a_torn_reading_never_counts_a_holders_memory_as_free_too() {
    check(
        "
        card 24 measured
        cap 4
        margin 512
        consumer tts vram=3 coexist
        consumer llm vram=10 unload
        consumer train
        read free=21 tts=3
        +llm 12
        read free=21 tts=3 llm=10
        +train 16
        show
        read free=11 tts=3 llm=10
        show
        ",
        "
        queued llm at 1
        granted llm
        queued train at 1
        queue: train(0) | needs 16384 MiB, 8704 MiB free; waiting for the holders | unleased: 100 3G
        queue: train(0) | needs 16384 MiB, 8704 MiB free; waiting for the holders | unleased: 100 3G
        ",
    );
}

#[test]
fn preemption_asks_then_revokes_after_the_grace() {
    check(
        "
        preempt_after 5s
        consumer train preemptible grace=10s
        consumer tts prio=10
        +train
        +tts
        wait 4s
        wait 1s
        wait 9s
        wait 1s
        preempted train
        ",
        "
        queued train at 1
        granted train
        queued tts at 1
        preempt train for tts grace=10s
        revoke train
        ended train
        granted tts
        ",
    );
}

#[test]
fn a_preempted_holder_that_releases_in_time_is_not_revoked() {
    check(
        "
        preempt_after 5s
        consumer train preemptible grace=10s
        consumer tts prio=10
        +train
        +tts
        wait 5s
        wait 3s
        release train
        wait 20s
        ",
        "
        queued train at 1
        granted train
        queued tts at 1
        preempt train for tts grace=10s
        ended train
        granted tts
        ",
    );
}

#[test]
fn nothing_is_preemptible_by_default_nor_by_an_equal_priority() {
    check(
        "
        preempt_after 5s
        consumer train
        consumer tts prio=10
        consumer batch preemptible
        +train
        +tts
        wait 60s
        release train
        +batch
        +batch
        wait 60s
        ",
        "
        queued train at 1
        granted train
        queued tts at 1
        ended train
        granted tts
        queued batch at 1
        queued batch at 2
        ",
    );
}

#[test]
fn preemption_frees_memory_for_a_higher_priority_waiter() {
    check(
        "
        card 24
        cap 4
        preempt_after 1s
        consumer train preemptible grace=30s
        consumer image prio=5
        +train 16
        +image 14
        wait 1s
        release train
        ",
        "
        queued train at 1
        granted train
        queued image at 1
        preempt train for image grace=30s
        ended train
        granted image
        ",
    );
}

/// The benchmark's training run waited until aging let it through, then
/// was preempted within seconds by a waiter it had just been served
/// before, after the LLM and the image generator had unloaded for it. A
/// holder stands at the effective priority it was granted at: only a
/// waiter above that may preempt it.
#[test]
fn a_holder_that_aging_let_through_is_preempted_only_by_a_waiter_above_it() {
    check(
        "
        card 24
        cap 1
        aging 1m
        preempt_after 30s
        consumer train preemptible grace=10s
        consumer llm prio=1
        +llm 12
        +train 16
        wait 1m
        +llm 12
        release llm
        wait 40s
        show
        wait 30s
        ",
        "
        queued llm at 1
        granted llm
        queued train at 1
        queued llm at 2
        ended llm
        granted train
        queue: llm(1)
        preempt train for llm grace=10s
        ",
    );
}

/// The benchmark's idle card: the image generator unloaded for the
/// training run, but an LLM job backfilled meanwhile took the room, and
/// the training run waited for its admission's deadline with nobody left
/// to wait for, while the LLM, done, kept its model. Once everyone asked
/// has unloaded, admission decides again at once.
#[test]
fn once_everyone_asked_has_unloaded_admission_decides_again_at_once() {
    check(
        "
        card 24 measured
        cap 4
        margin 0
        consumer llm vram=10 unload
        consumer image vram=8 unload
        consumer train
        read free=24
        +image 14
        read free=10 image=14
        release image
        read free=16 image=8
        +train 18
        +llm 12
        read free=12 llm=12
        release llm
        read free=14 llm=10
        read free=24
        show
        ",
        "
        queued image at 1
        granted image
        ended image
        queued train at 1
        unload image (8G, peak 14G) for train
        queued llm at 2
        granted llm
        ended llm
        unload llm (10G, peak 12G) for train
        granted train
        queue:
        ",
    );
}

#[test]
fn wait_estimates_come_from_learned_hold_times() {
    let t0 = Instant::now();
    let mut sched: Scheduler<()> = Scheduler::single(1, false, []);
    let ask = |name: &str| Request {
        consumer: name.into(),
        ..Request::default()
    };
    // Nothing learned yet: unknown.
    sched.enqueue(ask("tts"), (), t0).unwrap();
    let token = sched.grant_ready(t0).grants[0].token;
    sched.enqueue(ask("tts"), (), t0).unwrap();
    assert_eq!(sched.snapshot(t0).waiters[0].estimated_wait, None);
    // Three leases of 10 s each.
    let mut now = t0;
    let mut token = token;
    for _ in 0..3 {
        now += Duration::from_secs(10);
        sched.end(token, LeaseEnd::Released, now).unwrap();
        token = sched.grant_ready(now).grants[0].token;
        sched.enqueue(ask("tts"), (), now).unwrap();
    }
    // A holder 4 s into a typical 10 s, one waiter ahead of 10 s more.
    now += Duration::from_secs(4);
    sched.enqueue(ask("tts"), (), now).unwrap();
    let waiters = sched.snapshot(now).waiters;
    let estimates: Vec<Option<u64>> = waiters
        .iter()
        .map(|w| w.estimated_wait.map(|d| d.as_secs()))
        .collect();
    assert_eq!(estimates, [Some(6), Some(16)]);
    assert_eq!(
        sched.estimated_wait(0, 2, now),
        Some(Duration::from_secs(16))
    );
}

#[test]
fn a_waiter_blocked_on_memory_waits_for_a_holder_not_for_a_free_permit() {
    let t0 = Instant::now();
    let spec = gpu(0, 24 * GIB, false);
    let settings = Settings {
        capacity: 4,
        ..Settings::default()
    };
    let mut sched: Scheduler<()> = Scheduler::new(settings, vec![spec], []);
    let ask = |vram_mib| Request {
        consumer: "train".into(),
        vram_mib,
        ..Request::default()
    };
    // One lease of 20 s teaches the typical hold.
    sched.enqueue(ask(16 * GIB), (), t0).unwrap();
    let token = sched.grant_ready(t0).grants[0].token;
    let mut now = t0 + Duration::from_secs(20);
    sched.end(token, LeaseEnd::Released, now).unwrap();
    sched.enqueue(ask(16 * GIB), (), now).unwrap();
    sched.grant_ready(now);
    now += Duration::from_secs(5);
    // Three permits are free, but not the memory: the holder's end is.
    sched.enqueue(ask(16 * GIB), (), now).unwrap();
    assert!(sched.grant_ready(now).grants.is_empty());
    let waiters = sched.snapshot(now).waiters;
    assert_eq!(waiters[0].estimated_wait, Some(Duration::from_secs(15)));
}

mod with_a_model {
    //! Random interleavings on a static card with backfill and priorities,
    //! checked against a model of the accounting: no grant over-commits the
    //! card, and every grant that is not the head's is a backfill the
    //! reservation rule allows.

    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        /// Consumer c asks for its model plus `extra` GiB.
        Enqueue(usize, u8),
        Withdraw(usize),
        End(usize),
        Unloaded(usize),
        Wait(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0usize..5, 0u8..9).prop_map(|(c, v)| Op::Enqueue(c, v)),
            1 => any::<usize>().prop_map(Op::Withdraw),
            3 => any::<usize>().prop_map(Op::End),
            1 => (0usize..5).prop_map(Op::Unloaded),
            1 => (0u16..20_000).prop_map(Op::Wait),
        ]
    }

    /// (name, model GiB, priority, may coexist)
    const CONSUMERS: [(&str, u64, i32, bool); 5] = [
        ("tts", 3, 10, true),
        ("llm", 10, 5, false),
        ("image", 6, 0, false),
        ("train", 0, 0, false),
        ("other", 0, -1, false),
    ];
    const TOTAL: u64 = 24 * GIB;
    const MARGIN: u64 = GIB / 2;

    #[derive(Debug)]
    struct Held {
        consumer: usize,
        vram: u64,
        /// The waiters ordered before it when it was backfilled.
        overtook: BTreeSet<WaiterId>,
    }

    #[derive(Default)]
    struct Model {
        /// Waiting: id → (consumer, vram, priority).
        waiting: BTreeMap<WaiterId, (usize, u64, i32)>,
        held: BTreeMap<FencingToken, Held>,
        /// Residents: consumer → model size.
        residents: BTreeMap<usize, u64>,
    }

    impl Model {
        fn used(&self) -> u64 {
            self.held.values().map(|h| h.vram).sum::<u64>() + self.residents.values().sum::<u64>()
        }

        fn headroom(&self, consumer: usize) -> i128 {
            i128::from(TOTAL) - i128::from(self.used()) - i128::from(MARGIN)
                + i128::from(self.residents.get(&consumer).copied().unwrap_or(0))
        }

        fn head(&self) -> Option<WaiterId> {
            self.waiting
                .iter()
                .max_by_key(|(id, (_, _, p))| (*p, std::cmp::Reverse(**id)))
                .map(|(id, _)| *id)
        }

        /// The reservation rule, as the model sees it.
        fn head_would_fit_without_backfill(&self, head: WaiterId, capacity: usize) -> bool {
            let (consumer, vram, _) = self.waiting[&head];
            let backfilled: Vec<&Held> = self
                .held
                .values()
                .filter(|h| h.overtook.contains(&head))
                .collect();
            let freed: u64 = backfilled.iter().map(|h| h.vram).sum();
            !backfilled.is_empty()
                && self.held.len() - backfilled.len() < capacity
                && self.headroom(consumer) + i128::from(freed) >= i128::from(vram)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn backfill_and_priorities_keep_the_promises(
            capacity in 1usize..4,
            ops in proptest::collection::vec(op(), 1..150),
        ) {
            let settings = Settings {
                capacity,
                safety_margin_mib: MARGIN,
                backfill: true,
                ..Settings::default()
            };
            let spec = gpu(0, TOTAL, false);
            let profiles = CONSUMERS.iter().map(|&(name, model, priority, coexist)| ConsumerProfile {
                vram_mib: model * GIB,
                priority,
                coexist,
                unloadable: true,
                ..ConsumerProfile::new(name, ConsumerKind::Other)
            });
            let mut sched: Scheduler<usize> = Scheduler::new(settings, vec![spec], profiles);
            let mut model = Model::default();
            let mut ids: Vec<WaiterId> = Vec::new();
            let mut tokens: Vec<FencingToken> = Vec::new();
            let mut gone: BTreeSet<WaiterId> = BTreeSet::new();
            let mut now = Instant::now();
            let mut last_token = 0;
            for op in ops {
                match op {
                    Op::Enqueue(c, extra) => {
                        let (name, model_gib, priority, _) = CONSUMERS[c];
                        // A job needs its model and then some: nobody asks
                        // for less than it keeps.
                        let vram = (model_gib + u64::from(extra)).max(1) * GIB;
                        let request = Request {
                            consumer: name.into(),
                            vram_mib: vram,
                            ..Request::default()
                        };
                        match sched.enqueue(request, c, now) {
                            Ok((id, _, _)) => {
                                ids.push(id);
                                model.waiting.insert(id, (c, vram, priority));
                            }
                            Err(Rejection::TooLarge { .. }) => prop_assert!(vram > TOTAL),
                            Err(e) => prop_assert!(false, "unexpected rejection {e}"),
                        }
                    }
                    Op::Withdraw(n) if !ids.is_empty() => {
                        let id = ids[n % ids.len()];
                        let withdrawn = sched.withdraw(id, Withdrawal::Withdrawn, now);
                        prop_assert_eq!(withdrawn.is_some(), model.waiting.remove(&id).is_some());
                        gone.insert(id);
                    }
                    Op::End(n) if !tokens.is_empty() => {
                        let token = tokens[n % tokens.len()];
                        let ended = sched.end(token, LeaseEnd::Released, now);
                        let held = model.held.remove(&token);
                        prop_assert_eq!(ended.is_some(), held.is_some());
                        if let Some(held) = held {
                            let model_mib = CONSUMERS[held.consumer].1 * GIB;
                            let still = model.held.values().any(|h| h.consumer == held.consumer);
                            if model_mib > 0 && !still {
                                model.residents.insert(held.consumer, model_mib);
                            }
                        }
                    }
                    Op::Unloaded(c) => {
                        if sched.unloaded(CONSUMERS[c].0, None, now) {
                            model.residents.remove(&c);
                        }
                    }
                    Op::Wait(ms) => now += Duration::from_millis(u64::from(ms)),
                    Op::Withdraw(_) | Op::End(_) => {}
                }
                let decisions = sched.grant_ready(now);
                for grant in decisions.grants {
                    let id = grant.waiter;
                    prop_assert!(!gone.contains(&id), "granted a waiter that withdrew");
                    let head = model.head();
                    let (consumer, vram, priority) = model.waiting[&id];
                    let backfilled = head != Some(id);
                    let mut overtook = BTreeSet::new();
                    if backfilled {
                        overtook = model
                            .waiting
                            .iter()
                            .filter(|(w, (_, _, p))| *p > priority || (*p == priority && **w < id))
                            .map(|(w, _)| *w)
                            .collect();
                        let head = head.expect("a head");
                        prop_assert!(
                            !model.head_would_fit_without_backfill(head, capacity),
                            "backfilled {:?} ahead of {:?}, which held the reservation", id, head
                        );
                        prop_assert!(model.held.len() < capacity);
                    }
                    // No over-commit: what it takes fits beside everything
                    // held and resident, its own residency counted as room.
                    prop_assert!(
                        model.headroom(consumer) >= i128::from(vram),
                        "granted {} MiB with {} MiB of room", vram, model.headroom(consumer)
                    );
                    model.waiting.remove(&id);
                    model.residents.remove(&consumer);
                    model.held.insert(grant.token, Held { consumer, vram, overtook });
                    prop_assert!(model.used() + MARGIN <= TOTAL, "over-committed: {} MiB", model.used());
                    prop_assert!(grant.token.0 > last_token);
                    last_token = grant.token.0;
                    tokens.push(grant.token);
                }
                // Residents the core asked to unload stay until they say so.
                prop_assert!(model.held.len() <= capacity);
                prop_assert_eq!(sched.in_flight(), model.held.len());
                prop_assert_eq!(sched.queue_depth(), model.waiting.len());
            }
        }
    }
}

mod measured {
    //! Random interleavings on a measured card: consumers load models,
    //! allocate, free, unload and make way on their own schedule, and the
    //! core sees only readings taken from that truth now and then. A reading
    //! may be torn, as NVML's is: its free memory and its processes are two
    //! calls, and other steps may happen between them. At every grant, the
    //! truth — what each holder was promised or uses, whichever is more,
    //! plus what everyone else keeps — must fit the card less the margin.

    use proptest::prelude::*;

    use super::*;

    /// (name, model GiB, job GiB, priority, coexist, preemptible)
    const CONSUMERS: [(&str, u64, u64, i32, bool, bool); 4] = [
        ("tts", 3, 1, 2, true, false),
        ("llm", 10, 2, 1, false, false),
        ("image", 8, 6, 1, false, false),
        ("train", 0, 16, 0, false, true),
    ];
    const TOTAL: u64 = 24 * GIB;
    const MARGIN: u64 = GIB / 2;

    #[derive(Clone, Debug)]
    enum Op {
        Enqueue(usize),
        /// The holder of consumer c allocates what it asked for.
        Allocate(usize),
        /// The holder of consumer c frees its job's memory and releases.
        Release(usize),
        /// Consumer c, idle, frees its model.
        Unload(usize),
        Read,
        /// A reading starts: one half of it (the free memory, or the
        /// processes when `true`) is read now, the other half at the next
        /// `Read`, after whatever steps come between.
        StartRead(bool),
        Wait(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0usize..4).prop_map(Op::Enqueue),
            3 => (0usize..4).prop_map(Op::Allocate),
            3 => (0usize..4).prop_map(Op::Release),
            1 => (0usize..4).prop_map(Op::Unload),
            4 => Just(Op::Read),
            2 => any::<bool>().prop_map(Op::StartRead),
            1 => (0u16..40_000).prop_map(Op::Wait),
        ]
    }

    fn pid(c: usize) -> u32 {
        100 + c as u32
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn no_grant_over_commits_the_card_in_truth(
            capacity in 1usize..4,
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let settings = Settings {
                capacity,
                safety_margin_mib: MARGIN,
                backfill: true,
                aging: Duration::from_secs(120),
                preempt_after: Duration::from_secs(60),
                ..Settings::default()
            };
            let spec = gpu(0, TOTAL, true);
            let profiles = CONSUMERS.iter().map(|&(name, model, _, priority, coexist, preemptible)| {
                ConsumerProfile {
                    vram_mib: model * GIB,
                    priority,
                    coexist,
                    preemptible,
                    unloadable: !coexist,
                    ..ConsumerProfile::new(name, ConsumerKind::Other)
                }
            });
            let mut sched: Scheduler<usize> = Scheduler::new(settings, vec![spec], profiles);
            let mut now = Instant::now();
            // The truth: what each consumer's process holds.
            let mut memory = [0u64; 4];
            let mut waiting = [false; 4];
            let mut holding: [Option<(FencingToken, u64)>; 4] = [None; 4];
            // A reading whose free memory is `free`'s truth and whose
            // processes are `processes`'.
            let read = |free: &[u64; 4], processes: &[u64; 4]| MemoryReading {
                total_mib: TOTAL,
                used_mib: free.iter().sum(),
                free_mib: TOTAL - free.iter().sum::<u64>(),
                processes: (0..4)
                    .filter(|c| processes[*c] > 0)
                    .map(|c| ProcessUsage { pid: pid(c), used_mib: processes[c], ancestors: Vec::new() })
                    .collect(),
            };
            sched.observe(0, read(&memory, &memory), now);
            // A reading under way: which half was read first, what it saw,
            // and when it started (the reading's time, as the broker stamps
            // it).
            let mut started: Option<(bool, [u64; 4], Instant)> = None;
            for op in ops {
                now += Duration::from_millis(1);
                match op {
                    Op::Enqueue(c) if !waiting[c] && holding[c].is_none() => {
                        let (name, model, job, ..) = CONSUMERS[c];
                        let request = Request {
                            consumer: name.into(),
                            vram_mib: (model + job) * GIB,
                            client_pid: pid(c),
                            ..Request::default()
                        };
                        sched.enqueue(request, c, now).unwrap();
                        waiting[c] = true;
                    }
                    Op::Allocate(c) => {
                        if let Some((_, vram)) = holding[c] {
                            memory[c] = memory[c].max(vram);
                        }
                    }
                    Op::Release(c) => {
                        if let Some((token, _)) = holding[c].take() {
                            // The job's memory goes; the model stays, if any
                            // was loaded.
                            let model = CONSUMERS[c].1 * GIB;
                            memory[c] = if memory[c] >= model { model } else { 0 };
                            sched.end(token, LeaseEnd::Released, now).unwrap();
                        }
                    }
                    Op::Unload(c) => {
                        if holding[c].is_none() {
                            memory[c] = 0;
                        }
                    }
                    Op::Read => match started.take() {
                        Some((false, free, at)) => sched.observe(0, read(&free, &memory), at),
                        Some((true, processes, at)) => sched.observe(0, read(&memory, &processes), at),
                        None => sched.observe(0, read(&memory, &memory), now),
                    },
                    Op::StartRead(processes_first) => {
                        started.get_or_insert((processes_first, memory, now));
                    }
                    Op::Wait(ms) => now += Duration::from_millis(u64::from(ms)),
                    Op::Enqueue(_) => {}
                }
                let decisions = sched.grant_ready(now);
                for grant in decisions.grants {
                    let c = grant.payload;
                    prop_assert!(waiting[c]);
                    waiting[c] = false;
                    let (_, model, job, ..) = CONSUMERS[c];
                    holding[c] = Some((grant.token, (model + job) * GIB));
                    let committed: u64 = (0..4)
                        .map(|d| holding[d].map_or(memory[d], |(_, vram)| vram.max(memory[d])))
                        .sum();
                    prop_assert!(
                        committed + MARGIN <= TOTAL,
                        "granted {} ({:?}): committed {} MiB, memory {:?}, holding {:?}",
                        CONSUMERS[c].0, grant.token, committed, memory, holding
                    );
                }
                for token in decisions.revocations {
                    // A holder that did not make way: its lease ends; its
                    // process frees everything.
                    if let Some(c) = (0..4).find(|c| holding[*c].is_some_and(|(t, _)| t == token)) {
                        holding[c] = None;
                        memory[c] = 0;
                        sched.end(token, LeaseEnd::Revoked(RevokeReason::Preempted), now).unwrap();
                    }
                }
            }
        }
    }
}
