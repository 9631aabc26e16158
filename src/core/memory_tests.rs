//! Tests of VRAM admission, residency and eviction in the core.

use std::time::{Duration, Instant};

use super::*;

const GIB: u64 = 1024;

fn profile(name: &str, kind: ConsumerKind, vram_mib: u64, coexist: bool) -> ConsumerProfile {
    ConsumerProfile {
        vram_mib,
        coexist,
        unloadable: true,
        ..ConsumerProfile::new(name, kind)
    }
}

/// A 16 GiB card shared by a TTS service (3 GiB, may coexist), an LLM
/// server (10 GiB) and an image generator (12 GiB).
fn card(measured: bool, gpus: usize) -> Scheduler<&'static str> {
    let specs = (0..gpus as u32)
        .map(|index| GpuSpec {
            index,
            uuid: format!("GPU-{index}"),
            name: "Fake 16G".into(),
            total_mib: 16 * GIB,
            measured,
        })
        .collect();
    let settings = Settings {
        capacity: 1,
        strict: false,
        safety_margin_mib: 0,
        unload_timeout: Duration::from_secs(10),
        ..Settings::default()
    };
    Scheduler::new(
        settings,
        specs,
        [
            profile("tts", ConsumerKind::Tts, 3 * GIB, true),
            profile("llm", ConsumerKind::Llm, 10 * GIB, false),
            profile("image", ConsumerKind::Image, 12 * GIB, false),
        ],
    )
}

fn ask(name: &str, vram_mib: u64, pid: u32) -> Request {
    Request {
        consumer: name.into(),
        vram_mib,
        client_pid: pid,
        ..Request::default()
    }
}

/// Grants `name` a lease and ends it at once, leaving it resident.
fn use_once(sched: &mut Scheduler<&'static str>, name: &'static str, pid: u32, now: Instant) {
    sched.enqueue(ask(name, 0, pid), name, now).unwrap();
    let grants = sched.grant_ready(now).grants;
    assert_eq!(grants.len(), 1, "{name} was not granted");
    sched.end(grants[0].token, LeaseEnd::Released, now).unwrap();
}

fn reading(free_mib: u64, processes: &[(u32, u64)]) -> MemoryReading {
    MemoryReading {
        total_mib: 16 * GIB,
        used_mib: 16 * GIB - free_mib,
        free_mib,
        processes: processes
            .iter()
            .map(|&(pid, used_mib)| ProcessUsage {
                pid,
                used_mib,
                ancestors: Vec::new(),
            })
            .collect(),
    }
}

fn resident_names(sched: &Scheduler<&'static str>, now: Instant) -> Vec<String> {
    sched.snapshot(now).gpus[0]
        .residents
        .iter()
        .map(|r| r.resident.consumer.clone())
        .collect()
}

#[test]
fn the_lru_idle_resident_that_may_not_coexist_is_asked_to_unload() {
    let t0 = Instant::now();
    let mut sched = card(false, 1);
    use_once(&mut sched, "tts", 0, t0);
    use_once(&mut sched, "llm", 0, t0 + Duration::from_secs(1));
    assert_eq!(resident_names(&sched, t0), ["llm", "tts"]);

    let t1 = t0 + Duration::from_secs(2);
    sched
        .enqueue(ask("image", 12 * GIB, 0), "image", t1)
        .unwrap();
    let decisions = sched.grant_ready(t1);
    assert!(decisions.grants.is_empty(), "granted without room");
    let asked: Vec<&str> = decisions
        .unloads
        .iter()
        .map(|u| u.consumer.as_str())
        .collect();
    assert_eq!(
        asked,
        ["llm"],
        "only the LLM is in the way; TTS may coexist"
    );
    assert_eq!(decisions.unloads[0].footprint_mib, 10 * GIB);
    let blocked = sched.blocked(0).unwrap().to_string();
    assert!(blocked.contains("asked llm to unload"), "{blocked}");
    // Asking again changes nothing while the unload is under way.
    assert!(sched.grant_ready(t1).unloads.is_empty());

    // Without readings, the consumer's word is what frees the memory.
    let t2 = t1 + Duration::from_millis(700);
    assert!(sched.unloaded("llm", Some(0), t2));
    let grants = sched.grant_ready(t2).grants;
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].payload, "image");
    assert_eq!(resident_names(&sched, t2), ["tts"]);
    assert_eq!(sched.blocked(0), None);
}

#[test]
fn with_readings_the_grant_waits_until_the_memory_is_really_free() {
    let t0 = Instant::now();
    let mut sched = card(true, 1);
    sched.observe(0, reading(16 * GIB, &[]), t0);
    use_once(&mut sched, "tts", 100, t0);
    use_once(&mut sched, "llm", 200, t0 + Duration::from_secs(1));
    // Read after the last lease ended: memory decisions wait for that.
    let read = t0 + Duration::from_secs(1);
    sched.observe(
        0,
        reading(3 * GIB, &[(100, 3 * GIB), (200, 10 * GIB)]),
        read,
    );

    let t1 = t0 + Duration::from_secs(2);
    sched
        .enqueue(ask("image", 12 * GIB, 300), "image", t1)
        .unwrap();
    let asked = sched.grant_ready(t1).unloads;
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].consumer, "llm");

    // The unload command returned, but the memory is still in use.
    sched.observe(0, reading(3 * GIB, &[(100, 3 * GIB), (200, 10 * GIB)]), t1);
    assert!(sched.grant_ready(t1).grants.is_empty());

    let t2 = t1 + Duration::from_millis(1500);
    sched.observe(0, reading(13 * GIB, &[(100, 3 * GIB)]), t2);
    let grants = sched.grant_ready(t2).grants;
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].payload, "image");
    let evictions = sched.snapshot(t2).evictions;
    assert_eq!(
        (evictions.requested, evictions.completed, evictions.failed),
        (1, 1, 0)
    );
    assert_eq!(evictions.last_victim, "llm");
    assert_eq!(evictions.last_unload, Duration::from_millis(1500));

    // Memory promised to the new holder counts until it is allocated.
    let snapshot = sched.snapshot(t2);
    assert_eq!(snapshot.gpus[0].headroom_mib, i64::try_from(GIB).unwrap());
}

#[test]
fn a_resident_that_never_frees_its_memory_is_named() {
    let t0 = Instant::now();
    let mut sched = card(true, 1);
    sched.observe(0, reading(16 * GIB, &[]), t0);
    use_once(&mut sched, "llm", 200, t0);
    sched.observe(0, reading(6 * GIB, &[(200, 10 * GIB)]), t0);
    sched
        .enqueue(ask("image", 12 * GIB, 300), "image", t0)
        .unwrap();
    assert_eq!(sched.grant_ready(t0).unloads.len(), 1);
    assert_eq!(sched.next_deadline(t0), Some(t0 + Duration::from_secs(10)));

    let late = t0 + Duration::from_secs(10);
    sched.observe(0, reading(6 * GIB, &[(200, 10 * GIB)]), late);
    let decisions = sched.grant_ready(late);
    assert!(decisions.grants.is_empty() && decisions.unloads.is_empty());
    let blocked = sched.blocked(0).unwrap().to_string();
    assert!(
        blocked.starts_with("llm did not free its memory within 10s"),
        "{blocked}"
    );
    let snapshot = sched.snapshot(late);
    assert_eq!(snapshot.evictions.failed, 1);
    assert_eq!(
        snapshot.gpus[0].residents[0].resident.unload,
        Unload::NotFreed
    );
    // It stays named; it is not asked again and again.
    assert!(
        sched
            .grant_ready(late + Duration::from_secs(30))
            .unloads
            .is_empty()
    );

    // Once its process leaves the GPU, the waiter is granted.
    let later = late + Duration::from_secs(31);
    sched.observe(0, reading(16 * GIB, &[]), later);
    assert_eq!(sched.grant_ready(later).grants.len(), 1);
    assert!(resident_names(&sched, later).is_empty());
}

#[test]
fn a_consumer_reuses_its_own_resident_memory() {
    let t0 = Instant::now();
    let mut sched = card(false, 1);
    use_once(&mut sched, "tts", 0, t0);
    use_once(&mut sched, "llm", 0, t0);
    sched.enqueue(ask("llm", 10 * GIB, 0), "llm", t0).unwrap();
    let decisions = sched.grant_ready(t0);
    assert_eq!(decisions.grants.len(), 1);
    assert!(decisions.unloads.is_empty());
}

#[test]
fn requests_spread_over_two_gpus_and_can_name_one() {
    let t0 = Instant::now();
    let mut sched = card(false, 2);
    let (_, first, _) = sched.enqueue(ask("a", GIB, 0), "a", t0).unwrap();
    assert_eq!(sched.grant_ready(t0).grants[0].gpu_index, first);
    let (_, second, _) = sched.enqueue(ask("b", GIB, 0), "b", t0).unwrap();
    let grants = sched.grant_ready(t0).grants;
    assert_ne!(first, second, "both requests went to one GPU");
    assert_eq!(
        (grants[0].gpu_index, grants[0].gpu_uuid.as_str()),
        (second, "GPU-1")
    );

    let named = Request {
        gpu: GpuChoice::Uuid("gpu-0".into()),
        ..ask("c", GIB, 0)
    };
    assert_eq!(sched.enqueue(named, "c", t0).unwrap().1, 0);
    let missing = Request {
        gpu: GpuChoice::Index(7),
        ..ask("d", GIB, 0)
    };
    let error = sched.enqueue(missing, "d", t0).unwrap_err().to_string();
    assert_eq!(
        error,
        "no GPU is \"7\"; the broker has 0 (GPU-0), 1 (GPU-1)"
    );
}

#[test]
fn a_request_larger_than_every_gpu_is_refused_at_once() {
    let t0 = Instant::now();
    let mut sched = card(false, 2);
    let error = sched
        .enqueue(ask("huge", 20 * GIB, 0), "huge", t0)
        .unwrap_err();
    assert_eq!(
        error,
        Rejection::TooLarge {
            need_mib: 20 * GIB,
            total_mib: 16 * GIB
        }
    );
    assert_eq!(sched.queue_depth(), 0);
}

#[test]
fn processes_without_a_lease_are_flagged_and_peaks_are_learned() {
    let t0 = Instant::now();
    let mut sched = card(true, 1);
    sched.observe(0, reading(16 * GIB, &[]), t0);
    sched.enqueue(ask("llm", 0, 200), "llm", t0).unwrap();
    let token = sched.grant_ready(t0).grants[0].token;
    // The holder's child (pid 201) uses 11 GiB; pid 666 belongs to nobody.
    let child = ProcessUsage {
        pid: 201,
        used_mib: 11 * GIB,
        ancestors: vec![200, 1],
    };
    let stranger = ProcessUsage {
        pid: 666,
        used_mib: GIB,
        ancestors: vec![],
    };
    let r = MemoryReading {
        total_mib: 16 * GIB,
        used_mib: 12 * GIB,
        free_mib: 4 * GIB,
        processes: vec![child, stranger.clone()],
    };
    sched.observe(0, r, t0);
    let snapshot = sched.snapshot(t0);
    assert_eq!(snapshot.gpus[0].unleased, [stranger]);
    assert_eq!(snapshot.holders[0].peak_mib, 11 * GIB);

    sched.end(token, LeaseEnd::Released, t0).unwrap();
    let snapshot = sched.snapshot(t0);
    let llm = snapshot.consumers.iter().find(|c| c.name == "llm").unwrap();
    assert_eq!(llm.peak_mib, 11 * GIB);
    // The learned peak is larger than the configured 10 GiB, so it counts.
    assert_eq!(
        snapshot.gpus[0].residents[0].resident.footprint_mib,
        11 * GIB
    );
}

#[test]
fn an_idle_ttl_ends_residency() {
    let t0 = Instant::now();
    let mut sched = Scheduler::<&str>::new(
        Settings::default(),
        vec![GpuSpec {
            index: 0,
            uuid: String::new(),
            name: String::new(),
            total_mib: 16 * GIB,
            measured: false,
        }],
        [ConsumerProfile {
            idle_ttl: Some(Duration::from_secs(60)),
            ..profile("llm", ConsumerKind::Llm, 10 * GIB, false)
        }],
    );
    use_once(&mut sched, "llm", 0, t0);
    assert_eq!(sched.next_deadline(t0), Some(t0 + Duration::from_secs(60)));
    sched.expire_residents(t0 + Duration::from_secs(59));
    assert_eq!(resident_names(&sched, t0), ["llm"]);
    sched.expire_residents(t0 + Duration::from_secs(60));
    assert!(resident_names(&sched, t0).is_empty());
}

#[test]
fn grants_stop_at_the_token_ceiling_until_it_is_raised() {
    let t0 = Instant::now();
    let mut sched = card(false, 1);
    sched.set_tokens(41, 42);
    sched.enqueue(ask("a", 0, 0), "a", t0).unwrap();
    sched.enqueue(ask("b", 0, 0), "b", t0).unwrap();
    let first = sched.grant_ready(t0).grants;
    assert_eq!(first[0].token, FencingToken(42));
    assert_eq!(sched.tokens_left(), 0);
    sched.end(first[0].token, LeaseEnd::Released, t0).unwrap();
    assert!(
        sched.grant_ready(t0).grants.is_empty(),
        "granted above the ceiling"
    );
    sched.raise_token_ceiling(100);
    assert_eq!(sched.grant_ready(t0).grants[0].token, FencingToken(43));
}

/// One measured 16 GiB GPU with a lock delay and no configured consumers.
fn fenced_card(lock_delay: Duration) -> Scheduler<&'static str> {
    let settings = Settings {
        lock_delay,
        ..Settings::default()
    };
    let spec = GpuSpec {
        index: 0,
        uuid: String::new(),
        name: String::new(),
        total_mib: 16 * GIB,
        measured: true,
    };
    Scheduler::new(settings, vec![spec], [])
}

#[test]
fn a_vanished_holder_fences_the_gpu_until_its_processes_leave() {
    let t0 = Instant::now();
    let mut sched = fenced_card(Duration::from_secs(5));
    sched.observe(0, reading(16 * GIB, &[]), t0);
    // A polite release hands over at once.
    use_once(&mut sched, "polite", 300, t0);
    sched
        .enqueue(ask("crasher", 0, 400), "crasher", t0)
        .unwrap();
    let token = sched.grant_ready(t0).grants[0].token;
    sched.observe(0, reading(8 * GIB, &[(400, 8 * GIB)]), t0);
    sched.enqueue(ask("next", 0, 500), "next", t0).unwrap();
    sched.end(token, LeaseEnd::Disconnected, t0).unwrap();
    assert!(sched.grant_ready(t0).grants.is_empty());
    let blocked = sched.blocked(0).unwrap().to_string();
    assert!(
        blocked.starts_with("crasher vanished without releasing"),
        "{blocked}"
    );
    assert_eq!(sched.next_deadline(t0), Some(t0 + Duration::from_secs(5)));

    // Its process is still there a moment later; then it leaves.
    let t1 = t0 + Duration::from_millis(100);
    sched.observe(0, reading(8 * GIB, &[(400, 8 * GIB)]), t1);
    assert!(sched.grant_ready(t1).grants.is_empty());
    sched.observe(0, reading(16 * GIB, &[]), t1);
    assert_eq!(sched.grant_ready(t1).grants.len(), 1);
}

#[test]
fn the_lock_delay_bounds_the_wait_and_startup_strangers_quarantine() {
    let t0 = Instant::now();
    let mut sched = fenced_card(Duration::from_secs(5));
    sched.enqueue(ask("first", 0, 0), "first", t0).unwrap();
    assert!(
        sched.grant_ready(t0).grants.is_empty(),
        "granted before reading"
    );
    assert_eq!(
        sched.blocked(0).map(|b| b.reason().clone()),
        Some(Blocked::NoReading)
    );
    // At start, pid 777 uses the GPU without a lease.
    sched.observe(0, reading(12 * GIB, &[(777, 4 * GIB)]), t0);
    assert!(sched.grant_ready(t0).grants.is_empty());
    let blocked = sched.blocked(0).unwrap().to_string();
    assert!(
        blocked.starts_with("at start, processes 777 held the GPU"),
        "{blocked}"
    );
    let later = t0 + Duration::from_secs(5);
    sched.observe(0, reading(12 * GIB, &[(777, 4 * GIB)]), later);
    assert_eq!(
        sched.grant_ready(later).grants.len(),
        1,
        "the delay is a bound"
    );
}

mod interleavings {
    use std::collections::{BTreeMap, BTreeSet, VecDeque};

    use proptest::prelude::*;

    use super::*;

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
            let specs = (0..gpus as u32)
                .map(|index| GpuSpec {
                    index,
                    uuid: format!("GPU-{index}"),
                    name: String::new(),
                    total_mib: 16 * GIB,
                    measured: false,
                })
                .collect();
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
                    profile("tts", ConsumerKind::Tts, 3 * GIB, true),
                    profile("llm", ConsumerKind::Llm, 10 * GIB, false),
                    profile("image", ConsumerKind::Image, 6 * GIB, false),
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
                        let request = ask(names[c as usize], u64::from(vram) * GIB, 0);
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
