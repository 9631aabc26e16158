//! Scenario scripts for sharing one card: memory accounting on readings,
//! backfill and the reservation, priorities and aging, eviction order, and
//! preemption; then a property test of backfill and priorities against a
//! model.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::*;

const GIB: u64 = 1024;

/// Sizes in scripts are GiB, with decimals: `14`, `0.5`.
fn gib(text: &str) -> u64 {
    let gib: f64 = text
        .parse()
        .unwrap_or_else(|_| panic!("{text:?} is not GiB"));
    (gib * GIB as f64).round() as u64
}

/// GPU 0, of `total_mib`, with or without readings.
fn card(total_mib: u64, measured: bool) -> GpuSpec {
    GpuSpec {
        index: 0,
        uuid: "GPU-0".into(),
        name: "Fake".into(),
        total_mib,
        measured,
    }
}

fn duration(text: &str) -> Duration {
    humantime::parse_duration(text).unwrap_or_else(|_| panic!("{text:?} is not a duration"))
}

/// Runs a script against a one-GPU scheduler and compares what it decided
/// with `expected`. After every event the scheduler grants what is ready,
/// as the broker does, and each decision is printed.
///
/// Set-up lines come first:
/// - `card GIB [measured]`, `cap N`, `margin MIB`, `nobackfill`,
///   `aging DURATION`, `preempt_after DURATION`;
/// - `consumer NAME [vram=GIB] [coexist] [unload] [prio=N] [preemptible]
///   [grace=DURATION]`.
///
/// Events (each consumer's process is pid 100 + its number in order of
/// first mention):
/// - `+NAME GIB [prio=N]`: NAME asks; prints its position;
/// - `end NAME` / `drop NAME` / `revoked NAME`: NAME's oldest lease ends by
///   release, disconnect, or a preemption's revocation;
/// - `-NAME`: NAME's oldest waiting request withdraws;
/// - `wait DURATION`: time passes;
/// - `read free=GIB [NAME=GIB ...]`: a memory reading, taken now;
/// - `unloaded NAME`: NAME says it freed its memory;
/// - `show`: the queue with effective priorities, the reservation, why the
///   head waits, and the residents (and whether they were asked to unload).
#[track_caller]
fn check(script: &str, expected: &str) {
    let mut lines = script
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .peekable();
    let mut total_mib = 24 * GIB;
    let mut measured = false;
    let mut settings = Settings {
        capacity: 1,
        backfill: true,
        preempt_after: Duration::from_secs(30),
        ..Settings::default()
    };
    let mut profiles = Vec::new();
    while let Some(line) = lines.peek() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[0] {
            "card" => {
                total_mib = gib(words[1]);
                measured = words.get(2) == Some(&"measured");
            }
            "cap" => settings.capacity = words[1].parse().unwrap(),
            "margin" => settings.safety_margin_mib = words[1].parse().unwrap(),
            "nobackfill" => settings.backfill = false,
            "aging" => settings.aging = duration(words[1]),
            "preempt_after" => settings.preempt_after = duration(words[1]),
            "consumer" => {
                let mut profile = ConsumerProfile::new(words[1], ConsumerKind::Other);
                for word in &words[2..] {
                    match word.split_once('=') {
                        Some(("vram", size)) => profile.vram_mib = gib(size),
                        Some(("prio", n)) => profile.priority = n.parse().unwrap(),
                        Some(("grace", d)) => profile.preempt_grace = duration(d),
                        None if *word == "coexist" => profile.coexist = true,
                        None if *word == "unload" => profile.unloadable = true,
                        None if *word == "preemptible" => profile.preemptible = true,
                        _ => panic!("unknown consumer option {word:?}"),
                    }
                }
                profiles.push(profile);
            }
            _ => break,
        }
        lines.next();
    }
    let spec = card(total_mib, measured);
    let mut sched: Scheduler<String> = Scheduler::new(settings, vec![spec], profiles);
    let start = Instant::now();
    let mut now = start;
    let mut pids: Vec<String> = Vec::new();
    let mut pid = |name: &str| -> u32 {
        let n = pids.iter().position(|p| p == name).unwrap_or_else(|| {
            pids.push(name.to_owned());
            pids.len() - 1
        });
        100 + n as u32
    };
    let mut waiting: Vec<(String, WaiterId)> = Vec::new();
    let mut held: Vec<(String, FencingToken)> = Vec::new();
    let mut out = String::new();
    for line in lines {
        // Every event happens a moment after the one before, as in a
        // broker: a reading is never taken at the very instant of an end.
        now += Duration::from_millis(1);
        let words: Vec<&str> = line.split_whitespace().collect();
        let name = words.get(1).copied().unwrap_or("");
        match words[0] {
            "end" | "drop" | "revoked" => {
                let how = match words[0] {
                    "end" => LeaseEnd::Released,
                    "drop" => LeaseEnd::Disconnected,
                    _ => LeaseEnd::Revoked(RevokeReason::Preempted),
                };
                let index = held.iter().position(|(n, _)| n == name).expect("holds");
                let (_, token) = held.remove(index);
                let ended = sched.end(token, how, now).expect("held");
                writeln!(out, "ended {}", ended.consumer).unwrap();
            }
            "wait" => now += duration(name),
            "read" => {
                let mut reading = MemoryReading {
                    total_mib,
                    ..MemoryReading::default()
                };
                for word in &words[1..] {
                    let (key, size) = word.split_once('=').expect("KEY=GIB");
                    if key == "free" {
                        reading.free_mib = gib(size);
                    } else {
                        reading.processes.push(ProcessUsage {
                            pid: pid(key),
                            used_mib: gib(size),
                            ancestors: Vec::new(),
                        });
                    }
                }
                reading.used_mib = total_mib - reading.free_mib;
                sched.observe(0, reading, now);
            }
            "unloaded" => {
                sched.unloaded(name, None, now);
            }
            "show" => show(&sched, now, &mut out),
            "-" => unreachable!(),
            op if op.starts_with('+') => {
                let consumer = &op[1..];
                let priority = words
                    .iter()
                    .find_map(|w| w.strip_prefix("prio="))
                    .map(|n| n.parse().unwrap());
                let request = Request {
                    consumer: consumer.to_owned(),
                    vram_mib: words
                        .get(1)
                        .filter(|w| !w.contains('='))
                        .map_or(0, |size| gib(size)),
                    client_pid: pid(consumer),
                    priority,
                    ..Request::default()
                };
                match sched.enqueue(request, consumer.to_owned(), now) {
                    Ok((id, _, position)) => {
                        waiting.push((consumer.to_owned(), id));
                        writeln!(out, "queued {consumer} at {position}").unwrap();
                    }
                    Err(e) => writeln!(out, "rejected {consumer}: {e}").unwrap(),
                }
            }
            op if op.starts_with('-') => {
                let consumer = &op[1..];
                let index = waiting
                    .iter()
                    .position(|(n, _)| n == consumer)
                    .expect("waits");
                let (_, id) = waiting.remove(index);
                let gone = sched.withdraw(id, Withdrawal::Withdrawn, now);
                writeln!(out, "withdrew {}", gone.expect("was waiting")).unwrap();
            }
            _ => panic!("unknown event {line:?}"),
        }
        let decisions = sched.grant_ready(now);
        for unload in &decisions.unloads {
            writeln!(
                out,
                "unload {} for {}",
                unload.consumer, unload.for_consumer
            )
            .unwrap();
        }
        for p in &decisions.preemptions {
            let grace = humantime::format_duration(p.grace);
            writeln!(
                out,
                "preempt {} for {} grace={grace}",
                p.consumer, p.for_consumer
            )
            .unwrap();
        }
        for token in &decisions.revocations {
            let (name, _) = held.iter().find(|(_, t)| t == token).expect("held");
            writeln!(out, "revoke {name}").unwrap();
        }
        for grant in decisions.grants {
            waiting.retain(|(_, id)| *id != grant.waiter);
            held.push((grant.payload.clone(), grant.token));
            writeln!(out, "granted {}", grant.payload).unwrap();
        }
    }
    let expected: String = expected
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(out, expected, "script:\n{script}");
}

fn show(sched: &Scheduler<String>, now: Instant, out: &mut String) {
    let snapshot = sched.snapshot(now);
    let gpu = &snapshot.gpus[0];
    let queue: Vec<String> = gpu
        .waiters
        .iter()
        .map(|w| format!("{}({})", w.request.consumer, w.priority))
        .collect();
    write!(out, "queue:").unwrap();
    for waiter in queue {
        write!(out, " {waiter}").unwrap();
    }
    if let Some(reserved) = &gpu.reserved_for {
        write!(out, " | reserved: {reserved}").unwrap();
    }
    if let Some(blocked) = &gpu.blocked {
        write!(out, " | {blocked}").unwrap();
    }
    for r in &gpu.residents {
        let (keeps, peak) = (r.resident.footprint_mib / GIB, r.peak_mib / GIB);
        let unload = match r.resident.unload {
            Unload::NotAsked => "",
            Unload::Requested => " (asked to unload)",
            Unload::NotFreed => " (did not unload)",
        };
        write!(
            out,
            " | {} keeps {keeps}G peak {peak}G{unload}",
            r.resident.consumer
        )
        .unwrap();
    }
    writeln!(out).unwrap();
}

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
            end train
            show
            +tts 4
            end asr
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
        end llm
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
        unload llm for image
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
        end llm
        +image 20
        +tts 1
        +asr 1
        unloaded llm
        show
        +tts 1
        end tts
        show
        ",
        "
        queued llm at 1
        granted llm
        ended llm
        queued image at 1
        unload llm for image
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
            end train
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
        end batch
        end tts
        end llm
        end llm
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
        script.push_str("wait 4s\nend tts\n+tts\n");
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
        end llm
        +image 8
        end image
        +sd 4
        end sd
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
        unload image for train
        unload sd for train
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
        end image
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
        end llm
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
        queue: train(0) | needs 16384 MiB, 8704 MiB free; waiting for the holders
        queue: train(0) | needs 16384 MiB, 8704 MiB free; waiting for the holders
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
        revoked train
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
        end train
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
        end train
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
        end train
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
    let spec = card(24 * GIB, false);
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

    use std::collections::BTreeSet;

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
            let spec = card(TOTAL, false);
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
            let spec = card(TOTAL, true);
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
