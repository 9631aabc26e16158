//! Scenario scripts of VRAM admission, residency and eviction in the core,
//! then a property test of memory admission over several GPUs.

use super::script::check;

/// A 16 GiB card shared by a TTS service (3 GiB, may coexist), an LLM
/// server (10 GiB) and an image generator (12 GiB), in strict FIFO; the
/// scripts drive the clock and the grants themselves. A measured card is
/// read once, empty, before anything else.
fn shared_card(measured: bool) -> String {
    let (card, read) = if measured {
        ("card 16 measured", "read free=16")
    } else {
        ("card 16", "")
    };
    format!(
        "
        manual
        {card}
        nobackfill
        consumer tts vram=3 coexist unload
        consumer llm vram=10 unload
        consumer image vram=12 unload
        {read}
        "
    )
}

/// The TTS service, then a second later the LLM server, each hold a lease
/// once and stay resident.
const BOTH_USED_ONCE: &str = "
    +tts
    grant
    release tts
    wait 1s
    +llm
    grant
    release llm
";

/// What the scheduler decides for [`BOTH_USED_ONCE`].
const BOTH_USED_ONCE_DECIDED: &str = "
    queued tts at 1
    granted tts token=1 waited=0ms
    ended tts token=1 held=0ms
    queued llm at 1
    granted llm token=2 waited=0ms
    ended llm token=2 held=0ms
";

#[test]
fn the_lru_idle_resident_that_may_not_coexist_is_asked_to_unload() {
    check(
        &format!(
            "{}{BOTH_USED_ONCE}
            show
            wait 1s
            +image 12
            grant
            show
            grant
            wait 700ms
            unloaded llm 0
            grant
            show
            ",
            shared_card(false)
        ),
        // Only the LLM is in the way: TTS may coexist. Asking again changes
        // nothing while the unload is under way; without readings, the
        // consumer's word is what frees the memory.
        &format!(
            "{BOTH_USED_ONCE_DECIDED}
            queue: | llm keeps 10G peak 0G | tts keeps 3G peak 0G
        queued image at 1
        unload llm (10G, peak 0G) for image
        queue: image(0) | asked llm to unload; needs 12288 MiB, 3072 MiB free | llm keeps 10G peak 0G (asked to unload) | tts keeps 3G peak 0G
        granted image token=3 waited=700ms
            queue: | tts keeps 3G peak 0G
            "
        ),
    );
}

#[test]
fn with_readings_the_grant_waits_until_the_memory_is_really_free() {
    check(
        &format!(
            "{}{BOTH_USED_ONCE}
            read free=3 tts=3 llm=10
            wait 1s
            +image 12
            grant
            read free=3 tts=3 llm=10
            grant
            wait 1500ms
            read free=13 tts=3
            grant
            evictions
            headroom
            ",
            shared_card(true)
        ),
        // Read after the last lease ended: memory decisions wait for that.
        // The unload command returned, but the memory is still in use until
        // a reading shows it free. Memory promised to the new holder counts
        // until it is allocated.
        &format!(
            "{BOTH_USED_ONCE_DECIDED}
            queued image at 1
            unload llm (10G, peak 0G) for image
            granted image token=3 waited=1500ms
            evictions: 1 asked, 1 freed, 0 failed; last llm in 1s 500ms
            headroom 1G
            "
        ),
    );
}

#[test]
fn a_resident_that_never_frees_its_memory_is_named() {
    check(
        &format!(
            "{}
            +llm
            grant
            release llm
            read free=6 llm=10
            +image 12
            grant
            deadline
            wait 10s
            read free=6 llm=10
            grant
            show
            evictions
            wait 30s
            grant
            wait 1s
            read free=16
            grant
            show
            ",
            shared_card(true)
        ),
        // It stays named and is not asked again and again; once its process
        // leaves the GPU, the waiter is granted.
        "
        queued llm at 1
        granted llm token=1 waited=0ms
        ended llm token=1 held=0ms
        queued image at 1
        unload llm (10G, peak 0G) for image
        next deadline in 10s
        queue: image(0) | llm did not free its memory within 10s; needs 12288 MiB, 6144 MiB free | llm keeps 10G peak 0G (did not unload)
        evictions: 1 asked, 0 freed, 1 failed
        granted image token=2 waited=41000ms
        queue:
        ",
    );
}

#[test]
fn a_consumer_reuses_its_own_resident_memory() {
    check(
        &format!(
            "{}{BOTH_USED_ONCE}
            +llm 10
            grant
            ",
            shared_card(false)
        ),
        &format!(
            "{BOTH_USED_ONCE_DECIDED}
            queued llm at 1
            granted llm token=3 waited=0ms
            "
        ),
    );
}

#[test]
fn requests_spread_over_two_gpus_and_can_name_one() {
    check(
        "
        manual
        card 16 gpus=2
        +a 1
        grant
        +b 1
        grant
        +c 1 gpu=gpu-0
        +d 1 gpu=7
        ",
        r#"
        queued a at 1 on 0
        granted a on 0 (GPU-0) token=1 waited=0ms
        queued b at 1 on 1
        granted b on 1 (GPU-1) token=2 waited=0ms
        queued c at 1 on 0
        rejected "d": no GPU is "7"; the broker has 0 (GPU-0), 1 (GPU-1)
        "#,
    );
}

#[test]
fn a_request_larger_than_every_gpu_is_refused_at_once() {
    check(
        "
        manual
        card 16 gpus=2
        +huge 20
        stats
        ",
        r#"
        rejected "huge": the request needs 20480 MiB but the largest GPU it may use has 16384 MiB
        in_flight=0 queue=0 grants=0 last_wait=0ms last_hold=0ms oldest=0ms EndCounts { released: 0, half_closed: 0, disconnected: 0, revoked: 0, withdrawn: 0, unclaimed: 0, expired: 0 }
        "#,
    );
}

#[test]
fn processes_without_a_lease_are_flagged_and_peaks_are_learned() {
    check(
        &format!(
            "{}
            +llm
            grant
            read free=4 llm/child=11 666=1
            show
            holders
            release llm
            consumers
            show
            ",
            shared_card(true)
        ),
        // The holder's child uses 11 GiB and counts as the holder's; pid 666
        // belongs to nobody. What the resident keeps is what its processes
        // hold in the latest reading.
        "
        queued llm at 1
        granted llm token=1 waited=0ms
        queue: | unleased: 666 1G
        holder llm token=1 on 0 peak 11G
        ended llm token=1 held=0ms
        consumer image grants=0 holding=0 waiting=0 peak 0G
        consumer llm grants=1 holding=0 waiting=0 peak 11G
        consumer tts grants=0 holding=0 waiting=0 peak 0G
        queue: | llm keeps 11G peak 11G | unleased: 666 1G
        ",
    );
}

#[test]
fn an_idle_ttl_ends_residency() {
    check(
        "
        manual
        card 16
        nobackfill
        consumer llm vram=10 unload ttl=60s
        +llm
        grant
        release llm
        deadline
        wait 59s
        sweep
        show
        wait 1s
        sweep
        show
        ",
        "
        queued llm at 1
        granted llm token=1 waited=0ms
        ended llm token=1 held=0ms
        next deadline in 1m
        queue: | llm keeps 10G peak 0G
        queue:
        ",
    );
}

#[test]
fn grants_stop_at_the_token_ceiling_until_it_is_raised() {
    check(
        &format!(
            "{}
            tokens 41 42
            +a
            +b
            grant
            tokens
            release a
            grant
            ceiling 100
            grant
            ",
            shared_card(false)
        ),
        "
        queued a at 1
        queued b at 2
        granted a token=42 waited=0ms
        tokens left: 0
        ended a token=42 held=0ms
        granted b token=43 waited=0ms
        ",
    );
}

/// One measured 16 GiB GPU with a lock delay of 5 s and no configured
/// consumers.
const FENCED_CARD: &str = "
    manual
    card 16 measured
    nobackfill
    lock_delay 5s
";

#[test]
fn a_vanished_holder_fences_the_gpu_until_its_processes_leave() {
    check(
        &format!(
            "{FENCED_CARD}
            read free=16
            +polite
            grant
            release polite
            +crasher
            grant
            read free=8 crasher=8
            +next
            drop crasher
            grant
            show
            deadline
            wait 100ms
            read free=8 crasher=8
            grant
            read free=16
            grant
            "
        ),
        // A polite release hands over at once; a vanished holder's process
        // is still there a moment later, then it leaves.
        "
        queued polite at 1
        granted polite token=1 waited=0ms
        ended polite token=1 held=0ms
        queued crasher at 1
        granted crasher token=2 waited=0ms
        queued next at 1
        ended crasher token=2 held=0ms
        queue: next(0) | crasher vanished without releasing; waiting up to 5s for its processes (101) to leave the GPU | crasher keeps 8G peak 8G
        next deadline in 5s
        granted next token=3 waited=100ms
        ",
    );
}

#[test]
fn the_lock_delay_bounds_the_wait_and_startup_strangers_quarantine() {
    check(
        &format!(
            "{FENCED_CARD}
            +first
            grant
            show
            read free=12 777=4
            grant
            show
            wait 5s
            read free=12 777=4
            grant
            "
        ),
        // Nothing is granted before the first reading; at start, pid 777
        // uses the GPU without a lease; the delay is a bound.
        "
        queued first at 1
        queue: first(0) | reading the GPU's memory
        queue: first(0) | at start, processes 777 held the GPU without a lease; waiting up to 5s for them to leave | unleased: 777 4G
        granted first token=1 waited=5000ms
        ",
    );
}

mod interleavings {
    //! Random interleavings over several GPUs with memory accounting and
    //! residents, checked against a model of each GPU's queue.

    use std::collections::{BTreeMap, BTreeSet, VecDeque};
    use std::time::{Duration, Instant};

    use proptest::prelude::*;

    use super::super::script::{GIB, gpu, unloadable};
    use super::super::*;

    fn ask(name: &str, vram_mib: u64) -> Request {
        Request {
            consumer: name.into(),
            vram_mib,
            ..Request::default()
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Consumer c asks for `vram` GiB on any GPU.
        Enqueue(u8, u8),
        Withdraw(usize),
        End(usize),
        Unloaded(u8),
        Grant,
        Wait(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..4, 0u8..14).prop_map(|(c, v)| Op::Enqueue(c, v)),
            1 => any::<usize>().prop_map(Op::Withdraw),
            2 => any::<usize>().prop_map(Op::End),
            1 => (0u8..4).prop_map(Op::Unloaded),
            3 => Just(Op::Grant),
            1 => (0u16..20_000).prop_map(Op::Wait),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Several GPUs with memory accounting and residents: per GPU, at
        /// most `capacity` holders, FIFO among live waiters, held memory
        /// within the card; tokens strictly increase; nobody is granted
        /// after withdrawing.
        #[test]
        fn memory_admission_keeps_the_invariants(
            gpus in 1usize..3,
            capacity in 1usize..3,
            ops in proptest::collection::vec(op(), 1..150),
        ) {
            let specs = (0..gpus as u32).map(|index| gpu(index, 16 * GIB, false)).collect();
            let settings = Settings {
                capacity,
                unload_timeout: Duration::from_secs(5),
                ..Settings::default()
            };
            let names = ["tts", "llm", "image", "other"];
            let mut sched: Scheduler<usize> = Scheduler::new(
                settings,
                specs,
                [
                    unloadable("tts", 3 * GIB, true),
                    unloadable("llm", 10 * GIB, false),
                    unloadable("image", 6 * GIB, false),
                ],
            );
            let mut now = Instant::now();
            let mut enqueued: Vec<(WaiterId, u32, u64)> = Vec::new();
            let mut queues: BTreeMap<u32, VecDeque<WaiterId>> = BTreeMap::new();
            let mut gone: BTreeSet<WaiterId> = BTreeSet::new();
            let mut held: BTreeMap<FencingToken, (u32, u64)> = BTreeMap::new();
            let mut granted: Vec<FencingToken> = Vec::new();
            let mut last_token = 0;

            for op in ops {
                match op {
                    Op::Enqueue(c, vram) => {
                        let request = ask(names[c as usize], u64::from(vram) * GIB);
                        match sched.enqueue(request, enqueued.len(), now) {
                            Ok((id, gpu, _)) => {
                                enqueued.push((id, gpu, u64::from(vram) * GIB));
                                queues.entry(gpu).or_default().push_back(id);
                            }
                            Err(Rejection::TooLarge { .. }) => prop_assert!(vram > 16),
                            Err(e) => prop_assert!(false, "unexpected rejection {e}"),
                        }
                    }
                    Op::Withdraw(n) if !enqueued.is_empty() => {
                        let (id, gpu, _) = enqueued[n % enqueued.len()];
                        let waiting = queues.get(&gpu).is_some_and(|q| q.contains(&id));
                        let withdrawn = sched.withdraw(id, Withdrawal::Withdrawn, now);
                        prop_assert_eq!(withdrawn.is_some(), waiting);
                        if waiting {
                            queues.get_mut(&gpu).unwrap().retain(|w| *w != id);
                            gone.insert(id);
                        }
                    }
                    Op::End(n) if !granted.is_empty() => {
                        let token = granted[n % granted.len()];
                        let ended = sched.end(token, LeaseEnd::Released, now);
                        prop_assert_eq!(ended.is_some(), held.remove(&token).is_some());
                    }
                    Op::Unloaded(c) => {
                        sched.unloaded(names[c as usize], None, now);
                    }
                    Op::Grant => {
                        for grant in sched.grant_ready(now).grants {
                            let (id, gpu, vram) = enqueued[grant.payload];
                            prop_assert_eq!(grant.waiter, id);
                            prop_assert_eq!(grant.gpu_index, gpu);
                            prop_assert!(!gone.contains(&id), "granted a gone waiter");
                            let queue = queues.get_mut(&gpu).unwrap();
                            prop_assert_eq!(queue.pop_front(), Some(id), "not FIFO on GPU {}", gpu);
                            prop_assert!(grant.token.0 > last_token);
                            last_token = grant.token.0;
                            held.insert(grant.token, (gpu, vram));
                            granted.push(grant.token);
                        }
                    }
                    Op::Wait(ms) => {
                        now += Duration::from_millis(u64::from(ms));
                        sched.expire_residents(now);
                    }
                    Op::Withdraw(_) | Op::End(_) => {}
                }
                for gpu in 0..gpus as u32 {
                    let on_gpu: Vec<u64> = held.values().filter(|(g, _)| *g == gpu).map(|(_, v)| *v).collect();
                    prop_assert!(on_gpu.len() <= capacity, "{} holders on GPU {}", on_gpu.len(), gpu);
                    let memory: u64 = on_gpu.iter().sum();
                    prop_assert!(memory <= 16 * GIB, "{} MiB held on a 16 GiB GPU {}", memory, gpu);
                }
                prop_assert_eq!(sched.in_flight(), held.len());
                prop_assert_eq!(sched.queue_depth(), queues.values().map(VecDeque::len).sum::<usize>());
            }
        }
    }
}
