//! The checker checked: hand-made histories, one clean and one for each
//! broken promise, must come out as expected. A checker that never fails
//! proves nothing.

use std::collections::BTreeMap;

use crate::broker::LogLine;
use crate::checker::{self, Instance, Report};
use crate::counter::Record;
use crate::history::{self, ClientKind, Entry, Ev, FaultKind, Op};

const MS: u64 = 1_000_000;

/// A hand-made history.
#[derive(Default)]
struct Story {
    entries: Vec<Entry>,
    log: Vec<LogLine>,
    instances: Vec<Instance>,
    counter: Option<Vec<Record>>,
    /// The last `seq` given to a line, by instance: lines are decided in
    /// the order they are added.
    seqs: BTreeMap<u32, u64>,
}

impl Story {
    fn new() -> Self {
        Self {
            instances: vec![Instance {
                instance: 1,
                killed_at: None,
            }],
            ..Self::default()
        }
    }

    fn ev(&mut self, ms: u64, op: &str, ev: Ev) -> &mut Self {
        self.entries.push(Entry {
            t: ms * MS,
            op: op.to_owned(),
            ev,
        });
        self
    }

    fn invoke(&mut self, ms: u64, op: &str) -> &mut Self {
        self.invoke_in(ms, op, 1)
    }

    fn invoke_in(&mut self, ms: u64, op: &str, instance: u32) -> &mut Self {
        self.ev(
            ms,
            op,
            Ev::Invoke {
                instance,
                pid: 0,
                max_wait_ms: 0,
                client: ClientKind::InProcess,
            },
        )
    }

    fn seen(&mut self, ms: u64, op: &str, token: u64) -> &mut Self {
        self.ev(
            ms,
            op,
            Ev::Granted {
                token,
                lease_id: format!("e-{token}"),
                epoch: 1,
            },
        )
    }

    /// The next `seq` of `instance`, as its broker would give it.
    fn seq(&mut self, instance: u32) -> u64 {
        let seq = self.seqs.entry(instance).or_default();
        *seq += 1;
        *seq
    }

    fn granted(&mut self, ms: u64, instance: u32, op: &str, token: u64) -> &mut Self {
        let seq = self.seq(instance);
        self.log.push(LogLine {
            instance,
            t: ms * MS,
            text: format!(
                "2026-01-01T00:00:00.000000Z  INFO gpulease::broker: granted seq={seq} consumer={op} lease_id=e-{token} token={token} waited_ms=0"
            ),
        });
        self
    }

    fn ended(&mut self, ms: u64, instance: u32, op: &str, token: u64, how: &str) -> &mut Self {
        let seq = self.seq(instance);
        self.log.push(LogLine {
            instance,
            t: ms * MS,
            text: format!(
                "2026-01-01T00:00:00.000000Z  WARN lease{{consumer={op} peer=None}}: gpulease::broker: lease ended seq={seq} consumer={op} lease_id=e-{token} token={token} waited_ms=0 held_ms=1 how=\"{how}\""
            ),
        });
        self
    }

    /// Puts the lines in the order they were read, and numbers them so:
    /// the broker decided in that order too.
    fn decided_as_read(&mut self) -> &mut Self {
        self.log.sort_by_key(|l| l.t);
        self.seqs.clear();
        for i in 0..self.log.len() {
            let seq = self.seq(self.log[i].instance);
            let text = &self.log[i].text;
            let at = text.find(" seq=").expect("a numbered line") + " seq=".len();
            let end = text[at..].find(' ').map_or(text.len(), |n| at + n);
            self.log[i].text = format!("{}{seq}{}", &text[..at], &text[end..]);
        }
        self
    }

    /// A polite holder: sent, queued, granted, released.
    fn holder(
        &mut self,
        op: &str,
        token: u64,
        sent: u64,
        granted: u64,
        released: u64,
    ) -> &mut Self {
        self.invoke(sent, op)
            .ev(sent + 1, op, Ev::FirstEvent)
            .seen(granted + 1, op, token)
            .ev(released, op, Ev::ReleaseSent)
            .ev(released + 2, op, Ev::Ended { code: "ok".into() })
            .granted(granted, 1, op, token)
            .ended(released + 1, 1, op, token, "released")
    }

    fn check(&self) -> Report {
        let ops: BTreeMap<String, Op> = history::fold(self.entries.clone());
        checker::check(&checker::Inputs {
            ops: &ops,
            log: &self.log,
            instances: &self.instances,
            capacity: 1,
            bound: 600 * MS,
            slack: 1000 * MS,
            counter: self.counter.as_deref(),
        })
    }
}

fn write(token: u64, value: u64) -> Record {
    Record {
        kind: b'W',
        high_water: token,
        value,
        token,
    }
}

/// Every case: its name, its story, and the promise it must break (none for
/// the clean one).
fn cases() -> Vec<(&'static str, Story, Option<&'static str>)> {
    let mut cases = Vec::new();

    let mut clean = Story::new();
    clean
        .holder("a", 1, 0, 5, 10)
        .holder("b", 2, 6, 12, 20)
        .holder("c", 3, 7, 22, 30);
    clean.counter = Some(vec![write(1, 1), write(2, 2), write(3, 3)]);
    cases.push(("a clean history", clean, None));

    let mut overlap = Story::new();
    // b is granted while a has not even sent its release.
    overlap.holder("a", 1, 0, 5, 40).holder("b", 2, 6, 12, 20);
    overlap.decided_as_read();
    cases.push(("two holders at once", overlap, Some("capacity")));

    let mut regression = Story::new();
    regression
        .holder("a", 1, 0, 5, 10)
        .holder("b", 2, 11, 12, 20);
    regression.instances = vec![
        Instance {
            instance: 1,
            killed_at: Some(25 * MS),
        },
        Instance {
            instance: 2,
            killed_at: None,
        },
    ];
    regression
        .invoke_in(30, "c", 2)
        .ev(31, "c", Ev::FirstEvent)
        .seen(33, "c", 1)
        .granted(32, 2, "c", 1)
        .ended(40, 2, "c", 1, "disconnected");
    cases.push(("tokens back after a restart", regression, Some("tokens")));

    let mut overtaken = Story::new();
    // d is queued at 2, e is sent at 3, yet e is granted first.
    overtaken
        .holder("h", 1, 0, 1, 10)
        .invoke(1, "d")
        .ev(2, "d", Ev::FirstEvent)
        .invoke(3, "e")
        .ev(4, "e", Ev::FirstEvent)
        .seen(12, "e", 2)
        .granted(11, 1, "e", 2)
        .ev(15, "e", Ev::ReleaseSent)
        .ended(16, 1, "e", 2, "released")
        .seen(18, "d", 3)
        .granted(17, 1, "d", 3)
        .ev(20, "d", Ev::ReleaseSent)
        .ended(21, 1, "d", 3, "released");
    overtaken.decided_as_read();
    cases.push(("a waiter overtaken", overtaken, Some("fifo")));

    let mut abandoned = Story::new();
    // f waits from 2 and cancels at 40; g, sent at 3, is granted at 11.
    abandoned
        .holder("h", 1, 0, 1, 10)
        .invoke(1, "f")
        .ev(2, "f", Ev::FirstEvent)
        .invoke(3, "g")
        .seen(12, "g", 2)
        .granted(11, 1, "g", 2)
        .ev(15, "g", Ev::ReleaseSent)
        .ended(16, 1, "g", 2, "released")
        .ev(40, "f", Ev::CancelSent)
        .ev(41, "f", Ev::Ended { code: "ok".into() });
    abandoned.decided_as_read();
    cases.push(("a live waiter skipped", abandoned, Some("fifo")));

    let mut late = Story::new();
    // k cancels at 5 (done at 6); m is sent at 20 and granted token 2; k is
    // granted token 3 afterwards.
    late.holder("h", 1, 0, 1, 30)
        .invoke(2, "k")
        .ev(3, "k", Ev::FirstEvent)
        .ev(5, "k", Ev::CancelSent)
        .ev(6, "k", Ev::Ended { code: "ok".into() })
        .holder("m", 2, 20, 31, 40)
        .granted(41, 1, "k", 3)
        .ended(42, 1, "k", 3, "disconnected");
    late.decided_as_read();
    cases.push(("a grant after a cancel", late, Some("grant after cancel")));

    let mut slow = Story::new();
    slow.invoke(0, "n")
        .ev(1, "n", Ev::FirstEvent)
        .seen(2, "n", 1)
        .granted(1, 1, "n", 1)
        .ev(
            10,
            "n",
            Ev::Fault {
                fault: FaultKind::Stop,
            },
        )
        .ended(5010, 1, "n", 1, "disconnected");
    cases.push(("a frozen holder noticed late", slow, Some("detection")));

    let mut lost = Story::new();
    lost.holder("a", 1, 0, 5, 10).holder("b", 2, 11, 12, 20);
    lost.counter = Some(vec![write(1, 1), write(2, 1)]);
    cases.push(("a lost update", lost, Some("lost update")));

    let mut panicked = Story::new();
    panicked.holder("a", 1, 0, 5, 10);
    panicked.log.push(LogLine {
        instance: 1,
        t: 50 * MS,
        text: "thread 'tokio-runtime-worker' panicked at src/broker/mod.rs:1:1".into(),
    });
    cases.push(("a panic", panicked, Some("panic")));

    let mut reordered = Story::new();
    // The end of a is written just after b's grant, but decided before it
    // (its seq is lower).
    reordered.holder("a", 1, 0, 5, 10).holder("b", 2, 6, 11, 20);
    reordered.log.swap(1, 2);
    cases.push(("an end line written late", reordered, None));

    let mut early = Story::new();
    // b is granted before a's end in decision order. The clients cannot
    // tell (a sent its release before b's grant was seen): only the seq
    // shows it, and a broker that wrote its lines in that order would once
    // have passed as writing late.
    early
        .invoke(0, "a")
        .ev(1, "a", Ev::FirstEvent)
        .seen(6, "a", 1)
        .ev(10, "a", Ev::ReleaseSent)
        .ev(14, "a", Ev::Ended { code: "ok".into() })
        .invoke(6, "b")
        .ev(7, "b", Ev::FirstEvent)
        .seen(13, "b", 2)
        .ev(20, "b", Ev::ReleaseSent)
        .ev(22, "b", Ev::Ended { code: "ok".into() })
        .granted(5, 1, "a", 1)
        .granted(12, 1, "b", 2)
        .ended(13, 1, "a", 1, "released")
        .ended(21, 1, "b", 2, "released");
    cases.push((
        "a grant before an end, in decision order",
        early,
        Some("capacity"),
    ));

    let mut unordered = Story::new();
    // Token 2 is decided before token 1; nobody's bounds can tell.
    unordered.holder("a", 2, 0, 5, 10).holder("b", 1, 1, 12, 20);
    cases.push(("tokens out of decision order", unordered, Some("tokens")));

    let mut unnumbered = Story::new();
    unnumbered.holder("a", 1, 0, 5, 10);
    unnumbered.log[0].text = unnumbered.log[0].text.replace(" seq=1", "");
    cases.push(("a line without seq", unnumbered, Some("log")));

    cases
}

/// Runs every case; the names and outcomes, or the first that went wrong.
pub(crate) fn run() -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    for (name, story, broken) in cases() {
        let report = story.check();
        match broken {
            None if !report.violations.is_empty() => {
                return Err(format!(
                    "{name}: unexpected violations {:?}",
                    report.violations
                ));
            }
            Some(promise) if report.count(promise) == 0 => {
                return Err(format!(
                    "{name}: the checker missed the broken promise {promise:?}; it found {:?}",
                    report.violations
                ));
            }
            _ => lines.push(format!(
                "{name}: {}",
                broken.map_or("no violation".to_owned(), |p| format!(
                    "{} {p} violation(s) found",
                    report.count(p)
                ))
            )),
        }
    }
    Ok(lines)
}
